//! `sg-agent detach`: remove every program, link and pin the agent made, or the programs
//! of one interface. An agent that runs on the pins would put them back: detach refuses
//! while one runs, unless `--force`, which stops it first (SPEC §6).

#![forbid(unsafe_code)]

use std::{
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use crate::{agent, datapath, sys};

pub(super) fn detach(pin_dir: &Path, interface: Option<&str>, force: bool) -> ExitCode {
    if !pin_dir.exists() {
        println!("nothing to detach at {}", pin_dir.display());
        return ExitCode::SUCCESS;
    }
    let run_dir = agent::default_run_dir(pin_dir);
    if let Some(pid) = agent::holder(&run_dir) {
        if !force {
            eprintln!(
                "sg-agent (pid {pid}) is running on {}: it would restore what detach removes. Stop it first, or use --force to stop it and detach",
                pin_dir.display()
            );
            return ExitCode::FAILURE;
        }
        if let Err(e) = stop(&run_dir, pid) {
            eprintln!("sg-agent detach --force: {e}");
            return ExitCode::FAILURE;
        }
    }
    match interface {
        Some(name) => detach_interface(pin_dir, name),
        None => detach_all(pin_dir, &run_dir),
    }
}

/// Stops the agent `pid` and waits (up to 10 s) for it to let go of the pins.
fn stop(run_dir: &Path, pid: u32) -> Result<(), String> {
    if pid == 0 {
        return Err("the agent holding the pins did not record its pid".into());
    }
    sys::terminate(pid).map_err(|e| format!("stopping sg-agent (pid {pid}): {e}"))?;
    let started = Instant::now();
    while agent::holder(run_dir).is_some() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err(format!("sg-agent (pid {pid}) did not stop within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("stopped sg-agent (pid {pid})");
    Ok(())
}

fn detach_interface(pin_dir: &Path, name: &str) -> ExitCode {
    let ifindex = sys::interfaces()
        .unwrap_or_default()
        .into_iter()
        .find(|h| h.name == name)
        .map(|h| h.ifindex);
    let Some(ifindex) = ifindex else {
        eprintln!("sg-agent detach: no interface {name} on this host");
        return ExitCode::FAILURE;
    };
    match datapath::unpin_interface(&datapath::links_dir(pin_dir), ifindex) {
        Ok(()) => {
            println!("detached {name} (ifindex {ifindex})");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sg-agent detach: {e}");
            ExitCode::FAILURE
        }
    }
}

fn detach_all(pin_dir: &Path, run_dir: &Path) -> ExitCode {
    let done = datapath::detach(pin_dir);
    for e in &done.errors {
        eprintln!("{e}");
    }
    let _ = std::fs::remove_dir_all(run_dir);
    println!(
        "detached: removed {} pins from {}",
        done.removed,
        pin_dir.display()
    );
    if done.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
