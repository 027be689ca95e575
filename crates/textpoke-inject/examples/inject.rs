//! `inject PID LIB.so ENTRY [--thread TID] [--repeat N]`: loads LIB.so
//! into process PID and calls `ENTRY(sock)` on a new thread there; prints
//! what the entry writes to the socket and the timings. With `--repeat`,
//! injects N times and prints the median, minimum and maximum stop of
//! the hijacked thread (the measurement quoted in the crate's report).

use std::io::Read;
use std::time::Duration;

use textpoke_inject::{inject, InjectOptions, SoImage};

fn usage(code: i32) -> ! {
    eprintln!("usage: inject PID LIB.so ENTRY [--thread TID] [--repeat N]");
    std::process::exit(code)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help") {
        usage(0);
    }
    if args.len() < 3 {
        usage(2);
    }
    let pid: i32 = args[0].parse().unwrap_or_else(|_| usage(2));
    let path = std::path::Path::new(&args[1]);
    let mut opts = InjectOptions::new(SoImage::Path(path), &args[2]);
    let mut repeat = 1;
    let mut rest = args[3..].iter();
    while let Some(a) = rest.next() {
        let value = rest.next().unwrap_or_else(|| usage(2));
        match a.as_str() {
            "--thread" => opts.thread = Some(value.parse().unwrap_or_else(|_| usage(2))),
            "--repeat" => repeat = value.parse().unwrap_or_else(|_| usage(2)),
            _ => usage(2),
        }
    }
    let mut stops: Vec<Duration> = Vec::new();
    for _ in 0..repeat {
        match inject(pid, &opts) {
            Ok(inj) => {
                let mut s = String::new();
                let _ = (&inj.socket).read_to_string(&mut s);
                if repeat == 1 {
                    eprintln!(
                        "thread {} ({:?}) stopped {:?}; {} remote calls; ready after {:?}; left mapped: {:x?}; passed over: {:?}",
                        inj.tid,
                        inj.interrupted,
                        inj.timing.stop,
                        inj.timing.remote_syscalls,
                        inj.timing.until_ready,
                        inj.left_mapped,
                        inj.passed_over
                    );
                    println!("{s}");
                }
                stops.push(inj.timing.stop);
            }
            Err(e) => {
                eprintln!("inject: {e}");
                std::process::exit(1);
            }
        }
    }
    if repeat > 1 {
        stops.sort();
        println!(
            "{repeat} injections; hijacked-thread stop: median {:?}, min {:?}, max {:?}",
            stops[stops.len() / 2],
            stops[0],
            stops[stops.len() - 1]
        );
    }
}
