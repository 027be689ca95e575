//! `textpoke selftest`: what the kernel offers, then a short stress of both
//! strategies in this machine's conditions.

use std::process::ExitCode;
use std::time::Duration;
use textpoke::stress::{self, StressConfig};
use textpoke::Strategy;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of stress per strategy
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Threads calling the sites
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Number of sites flipped per batch
    #[arg(long, default_value_t = 500)]
    sites: usize,
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

pub fn run(args: &Args) -> ExitCode {
    if !(args.seconds > 0.0 && args.seconds.is_finite()) || args.threads == 0 || args.sites == 0 {
        eprintln!("textpoke selftest: --seconds, --threads and --sites must be positive");
        return ExitCode::from(2);
    }
    let caps = textpoke::capabilities();
    println!("textpoke {} selftest", env!("CARGO_PKG_VERSION"));
    println!("  kernel                     {}", kernel_release());
    println!("  cores                      {}", std::thread::available_parallelism().map_or(0, |n| n.get()));
    println!("  membarrier SYNC_CORE       {}", yes(caps.membarrier_sync_core));
    println!("  MDWE refuse-exec-gain      {}", yes(caps.mdwe_refuse_exec_gain));
    println!("  sync cores with            {}", caps.sync_method);
    println!("  write code with            {}", caps.write_method);
    let mut failed = false;
    for strategy in [Strategy::Breakpoint, Strategy::StopMachine] {
        let cfg = StressConfig {
            threads: args.threads,
            sites: args.sites,
            strategy,
            duration: Duration::from_secs_f64(args.seconds),
            ..StressConfig::default()
        };
        match stress::run(&cfg) {
            Ok(r) => {
                let verdict = if r.failures == 0 { "ok" } else { "FAILED" };
                println!(
                    "  stress {:<13} {verdict}: {} commits of {} sites, {} calls checked ({} from signal handlers), {} traps emulated",
                    strategy.to_string(),
                    r.commits,
                    args.sites,
                    r.calls,
                    r.handler_calls,
                    r.traps
                );
                for e in &r.errors {
                    println!("    {e}");
                }
                failed |= r.failures > 0;
            }
            Err(e) => {
                println!("  stress {strategy:<13} FAILED: {e}");
                failed = true;
            }
        }
    }
    if failed {
        println!("selftest: FAILED");
        ExitCode::FAILURE
    } else {
        println!("selftest: ok");
        ExitCode::SUCCESS
    }
}
