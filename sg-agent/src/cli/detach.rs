//! `sg-agent detach`: remove every program, link and pin the agent made.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use crate::{agent, datapath};

pub(super) fn detach(pin_dir: &std::path::Path) -> ExitCode {
    if !pin_dir.exists() {
        println!("nothing to detach at {}", pin_dir.display());
        return ExitCode::SUCCESS;
    }
    let done = datapath::detach(pin_dir);
    for e in &done.errors {
        eprintln!("{e}");
    }
    let _ = std::fs::remove_dir_all(agent::default_run_dir(pin_dir));
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
