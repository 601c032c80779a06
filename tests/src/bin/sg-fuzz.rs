//! `cargo xtask fuzz [--frames N] [--seed S]`: the differential fuzz campaign of the
//! datapath against the reference model (`sg_tests::fuzz`). Exits non-zero on the first
//! disagreement, which names the seed and the frame.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<u64>())
    };
    let frames = match value("--frames") {
        None => 1_000_000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("sg-fuzz: --frames takes a positive number");
            return ExitCode::from(64);
        }
    };
    let seed = match value("--seed") {
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        Some(Ok(s)) => s,
        Some(Err(_)) => {
            eprintln!("sg-fuzz: --seed takes a number");
            return ExitCode::from(64);
        }
    };
    if !sg_tests::privileges::require_root("sg-fuzz") {
        return ExitCode::FAILURE;
    }
    eprintln!("sg-fuzz: {frames} frames from seed {seed} (--seed {seed} reproduces)");
    let started = std::time::Instant::now();
    let r = sg_tests::fuzz::campaign(frames, seed);
    println!(
        "sg-fuzz: {} frames agree with the reference model ({} passed, {} dropped, {} mutated; {} refused by the kernel's test run before the program ran) in {:.0?}",
        r.frames,
        r.passed,
        r.dropped,
        r.mutated,
        r.refused,
        started.elapsed()
    );
    ExitCode::SUCCESS
}
