//! poke-stress: threads call runtime-generated sites in tight loops (and
//! from a per-thread timer signal) while this thread flips every site
//! NOP<->CALL as one batch, checking every call is counted exactly.
//!
//! cargo run --release -p textpoke --example poke-stress -- \
//!     --threads 8 --sites 1000 --seconds 5 --strategy breakpoint

use std::process::ExitCode;
use std::time::Duration;
use textpoke::stress::{self, Layout, StressConfig};
use textpoke::{Strategy, SyncMethod};

const USAGE: &str = "usage: poke-stress [--threads N] [--sites N] [--seconds S] [--strategy breakpoint|stop-machine] \
                     [--layout single|region] [--timer-hz N] [--sync membarrier|signals] [--commits N]";

/// What the command line asks for.
enum Parsed {
    Run(StressConfig),
    /// `--help`: the usage on stdout, exit 0.
    Help,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Parsed, String> {
    let mut cfg = StressConfig { duration: Duration::from_secs(5), ..StressConfig::default() };
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Ok(Parsed::Help);
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|_| format!("{flag}: {v:?} is not a whole number"));
        match flag.as_str() {
            "--threads" => cfg.threads = num(&value)? as usize,
            "--sites" => cfg.sites = num(&value)?.max(1) as usize,
            "--seconds" => {
                cfg.duration =
                    Duration::from_secs_f64(value.parse().map_err(|_| format!("--seconds: {value:?} is not a number"))?)
            }
            "--strategy" => cfg.strategy = value.parse::<Strategy>()?,
            "--layout" => {
                cfg.layout = match value.as_str() {
                    "single" => Layout::Single,
                    "region" => Layout::Region,
                    _ => return Err(format!("--layout: expected single or region, got {value:?}")),
                }
            }
            "--timer-hz" => cfg.timer_hz = num(&value)? as u32,
            "--commits" => cfg.max_commits = Some(num(&value)?),
            "--sync" => {
                cfg.options.sync = Some(match value.as_str() {
                    "membarrier" => SyncMethod::Membarrier,
                    "signals" => SyncMethod::Signals,
                    _ => return Err(format!("--sync: expected membarrier or signals, got {value:?}")),
                })
            }
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    Ok(Parsed::Run(cfg))
}

fn main() -> ExitCode {
    run(std::env::args().skip(1))
}

/// Runs the command line `args` (without the program name).
fn run(args: impl Iterator<Item = String>) -> ExitCode {
    let cfg = match parse(args) {
        Ok(Parsed::Run(c)) => c,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    stress_and_report(&cfg)
}

fn stress_and_report(cfg: &StressConfig) -> ExitCode {
    match stress::run(cfg) {
        Ok(r) => {
            for e in &r.errors {
                eprintln!("poke-stress: {e}");
            }
            let verdict = if r.failures == 0 { "ok" } else { "FAILED" };
            println!(
                "poke-stress: {verdict} strategy={} commits={} calls={} traps={} failures={}",
                cfg.strategy, r.commits, r.calls, r.traps, r.failures
            );
            if r.failures == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("poke-stress: error: {e}");
            println!("poke-stress: FAILED strategy={} commits=0 calls=0 traps=0 failures=1", cfg.strategy);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(args: &[&str]) -> ExitCode {
        run(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn help_exits_0_and_bad_input_2() {
        assert_eq!(run_with(&["--help"]), ExitCode::SUCCESS);
        assert_eq!(run_with(&["-h"]), ExitCode::SUCCESS);
        assert_eq!(run_with(&["--threads", "2", "--help"]), ExitCode::SUCCESS);
        assert_eq!(run_with(&["--bogus", "1"]), ExitCode::from(2));
        assert_eq!(run_with(&["--threads"]), ExitCode::from(2));
        assert_eq!(run_with(&["--threads", "many"]), ExitCode::from(2));
    }

    #[test]
    fn options_are_read() {
        let Ok(Parsed::Run(cfg)) = parse(
            ["--threads", "3", "--sites", "7", "--seconds", "0.5", "--commits", "9"].map(String::from).into_iter(),
        ) else {
            panic!("not parsed");
        };
        assert_eq!((cfg.threads, cfg.sites, cfg.max_commits), (3, 7, Some(9)));
        assert_eq!(cfg.duration, Duration::from_millis(500));
    }
}
