//! Refusals (each with its message, the target still running and not
//! traced afterwards) and loader failures reported with dlerror's text.

mod common;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::*;
use textpoke_inject::{inject, InjectError, InjectOptions, LoaderStage, SoImage};

fn sleeper() -> Proc {
    Proc::spawn(&gcc("sleeper.c", "sleeper", &[]), &[])
}

#[test]
fn refuses_a_stopped_target() {
    let p = sleeper();
    let pid = p.pid();
    // SAFETY: signals a child of ours.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    while state(pid) != 'T' {
        std::thread::sleep(Duration::from_millis(1));
    }
    let so = hello_so();
    let e = inject(pid, &InjectOptions::new(SoImage::Path(&so), "hello_entry")).unwrap_err();
    assert!(matches!(e, InjectError::Stopped { .. }), "{e}");
    assert!(e.to_string().contains(&format!("kill -CONT {pid}")), "{e}");
    assert_eq!(state(pid), 'T', "the target must be left stopped");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    while state(pid) == 'T' {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_running_untraced(pid);
    let (code, _) = p.finish();
    assert_eq!(code, 0, "the sleeper saw a failed or short sleep");
}

#[test]
fn refuses_a_static_binary() {
    let p = Proc::spawn(&gcc("sleeper.c", "sleeper-static", &["-static"]), &[]);
    let pid = p.pid();
    let so = hello_so();
    let e = inject(pid, &InjectOptions::new(SoImage::Path(&so), "hello_entry")).unwrap_err();
    assert!(matches!(e, InjectError::Static { .. }), "{e}");
    assert!(e.to_string().contains("statically linked"), "{e}");
    assert_running_untraced(pid);
    assert_eq!(p.finish().0, 0);
}

#[test]
fn refuses_a_traced_target() {
    let p = sleeper();
    let pid = p.pid();
    let tracer = Proc::spawn(&gcc("tracer.c", "tracer", &[]), &[&pid.to_string()]);
    let so = hello_so();
    let e = inject(pid, &InjectOptions::new(SoImage::Path(&so), "hello_entry")).unwrap_err();
    match &e {
        InjectError::Traced { tracer: t, comm, .. } => {
            assert_eq!(*t, tracer.pid());
            assert_eq!(comm, "tracer");
        }
        other => panic!("expected Traced, got {other}"),
    }
    assert!(e.to_string().contains(&format!("traced by process {} (tracer)", tracer.pid())), "{e}");
    drop(tracer); // killed: its tracee is detached
    while status_field(&format!("/proc/{pid}/status"), "TracerPid") != "0" {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_running_untraced(pid);
    assert_eq!(p.finish().0, 0);
}

#[test]
fn refuses_a_nonexistent_pid() {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id() as i32;
    c.wait().unwrap();
    let so = hello_so();
    let e = inject(pid, &InjectOptions::new(SoImage::Path(&so), "hello_entry")).unwrap_err();
    assert!(matches!(e, InjectError::NoSuchProcess { .. }), "{e}");
    assert_eq!(e.to_string(), format!("process {pid} does not exist"));
}

#[test]
fn refuses_itself() {
    let so = hello_so();
    let e = inject(std::process::id() as i32, &InjectOptions::new(SoImage::Path(&so), "hello_entry")).unwrap_err();
    assert!(matches!(e, InjectError::IsSelf { .. }), "{e}");
}

#[test]
fn refuses_a_seccomp_filtered_target_unless_told_otherwise() {
    let p = Proc::spawn(&gcc("sleeper.c", "sleeper-seccomp", &["-DSECCOMP"]), &[]);
    let pid = p.pid();
    let so = hello_so();
    let mut opts = InjectOptions::new(SoImage::Path(&so), "hello_entry");
    let e = inject(pid, &opts).unwrap_err();
    assert!(matches!(e, InjectError::Seccomp { mode: "filter", .. }), "{e}");
    assert!(e.to_string().contains("seccomp_unverified"), "{e}");
    assert_running_untraced(pid);
    // Its filter allows everything: told to go on, the injection works.
    opts.seccomp_unverified = true;
    let inj = inject(pid, &opts).unwrap();
    let mut s = String::new();
    (&inj.socket).read_to_string(&mut s).unwrap();
    assert_eq!(s, format!("hello {pid}"));
    assert_eq!(p.finish().0, 0);
}

/// Run by `refuses_another_users_process` as uid 65534: tries to inject
/// into the process named by the environment and prints the error.
#[test]
#[ignore = "helper: run as another uid by refuses_another_users_process"]
fn other_user_helper() {
    let pid: i32 = std::env::var("TEXTPOKE_INJECT_TEST_PID").unwrap().parse().unwrap();
    let so = std::path::PathBuf::from("/nonexistent.so");
    match inject(pid, &InjectOptions::new(SoImage::Path(&so), "hello_entry")) {
        Ok(_) => println!("RESULT injected"),
        Err(e) => println!("RESULT {e}"),
    }
}

#[test]
fn refuses_another_users_process() {
    // SAFETY: no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: needs root to run the injector as another user");
        return;
    }
    let p = sleeper(); // ours: uid 0
    let pid = p.pid();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "other_user_helper", "--nocapture", "--test-threads=1"])
        .env("TEXTPOKE_INJECT_TEST_PID", pid.to_string())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = stdout
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("helper printed no result: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    assert!(result.starts_with(&format!("not permitted to ptrace process {pid}: it runs as uid 0/0/0")), "{result}");
    assert!(result.contains("we are uid 65534 without CAP_SYS_PTRACE"), "{result}");
    assert_running_untraced(pid);
    assert_eq!(p.finish().0, 0);
}

#[test]
fn a_target_killed_during_injection_ends_it_cleanly() {
    let exe = gcc("sleeper.c", "sleeper", &[]);
    let so = hello_so();
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    for round in 0..12u64 {
        let p = Proc::spawn(&exe, &[]);
        let pid = p.pid();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(300 + round * 900));
            // SAFETY: kills a child of ours (reaped by `p`'s drop).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let opts = InjectOptions::new(SoImage::Path(&so), "hello_entry");
        let mut injected = 0;
        let end = loop {
            match inject(pid, &opts) {
                Ok(inj) => {
                    let mut s = String::new();
                    let _ = (&inj.socket).read_to_string(&mut s);
                    injected += 1;
                }
                Err(e) => break e,
            }
        };
        killer.join().unwrap();
        let kind = match &end {
            InjectError::ExitedDuringInjection { .. } => "exited during injection",
            InjectError::Zombie { .. } => "zombie",
            InjectError::NoSuchProcess { .. } => "no such process",
            other => panic!("round {round}: after {injected} injections the kill gave an unclean error: {other}"),
        };
        *outcomes.entry(kind.to_string()).or_default() += 1;
        drop(p);
    }
    println!("outcomes: {outcomes:?}");
}

#[test]
fn reports_dlopen_and_dlsym_errors_and_leaves_nothing_open() {
    let p = sleeper();
    let pid = p.pid();
    let base_fds = fds(pid);
    let base_tasks = tasks(pid);

    let e =
        inject(pid, &InjectOptions::new(SoImage::Bytes(b"this is not an ELF file at all"), "hello_entry")).unwrap_err();
    match &e {
        InjectError::LoaderFailed { stage: LoaderStage::Dlopen, message, .. } => {
            assert!(message.contains(&format!("/proc/{pid}/fd/")), "{message}");
            assert!(message.contains("ELF") || message.contains("too short"), "{message}");
        }
        other => panic!("expected a dlopen failure, got {other}"),
    }

    let so = hello_so();
    let e = inject(pid, &InjectOptions::new(SoImage::Path(&so), "no_such_entry")).unwrap_err();
    match &e {
        InjectError::LoaderFailed { stage: LoaderStage::Dlsym, message, .. } => {
            assert!(message.contains("undefined symbol: no_such_entry"), "{message}")
        }
        other => panic!("expected a dlsym failure, got {other}"),
    }

    // And a good one afterwards, from bytes this time.
    let bytes = std::fs::read(&so).unwrap();
    let inj = inject(pid, &InjectOptions::new(SoImage::Bytes(&bytes), "hello_entry")).unwrap();
    let mut s = String::new();
    (&inj.socket).read_to_string(&mut s).unwrap();
    assert_eq!(s, format!("hello {pid}"));

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tasks(pid) != base_tasks && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(tasks(pid), base_tasks, "loader threads left behind");
    assert_eq!(fds(pid), base_fds, "descriptors left behind");
    assert_running_untraced(pid);
    assert_eq!(p.finish().0, 0, "the sleeper saw a failed or short sleep");
}
