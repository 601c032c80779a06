//! `cargo xtask bench`: benchmarks, not tests. Every figure is measured in this run, side by
//! side with its baseline, and written to docs/benchmarks.md (one section per benchmark)
//! and target/bench/results.json (median, min, max and ratio of each figure).
//!
//! sg-bench <compile|datapath|agent|peers|fleet|all> [--quick|--smoke]

mod agent;
mod compile;
mod datapath;
mod fleet;
mod object;
mod peers;
mod report;
mod scale;

use std::{process::ExitCode, time::Instant};

use sg_tests::privileges::require_root;

use report::{publish, SMOKE};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Full,
    Quick,
    Smoke,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = if args.iter().any(|a| a == "--smoke") {
        Mode::Smoke
    } else if args.iter().any(|a| a == "--quick") {
        Mode::Quick
    } else {
        Mode::Full
    };
    SMOKE.store(mode == Mode::Smoke, std::sync::atomic::Ordering::Relaxed);
    let what = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(String::as_str)
        .unwrap_or("all");
    let started = Instant::now();
    let run = |name: &str| what == "all" || what == name;
    if run("compile") {
        compile::bench_compile(mode);
    }
    if run("datapath") {
        if !require_root("bench datapath") {
            return ExitCode::FAILURE;
        }
        datapath::bench_datapath(mode);
    }
    if run("agent") {
        if !require_root("bench agent") {
            return ExitCode::FAILURE;
        }
        bench_agent(mode);
    }
    if run("peers") {
        if !require_root("bench peers") {
            return ExitCode::FAILURE;
        }
        peers::bench_peers(
            mode == Mode::Smoke,
            mode == Mode::Quick,
            &mut |name, md, v| publish(name, md, v),
        );
    }
    if run("fleet") {
        if !require_root("bench fleet") {
            return ExitCode::FAILURE;
        }
        fleet::bench_fleet(mode, &mut |name, md, v| publish(name, md, v));
    }
    if !["all", "compile", "datapath", "agent", "peers", "fleet"].contains(&what) {
        eprintln!(
            "sg-bench: unknown benchmark {what:?} (all, compile, datapath, agent, peers, fleet)"
        );
        return ExitCode::from(64);
    }
    eprintln!("sg-bench: done in {:.0?}", started.elapsed());
    ExitCode::SUCCESS
}

fn bench_agent(mode: Mode) {
    agent::bench_agent(
        mode == Mode::Smoke,
        mode == Mode::Quick,
        &mut |name, md, v| publish(name, md, v),
    );
}
