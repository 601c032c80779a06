//! `cargo xtask bench`: builds the benchmark runner (and the agent it drives) and runs it.
//! Results go to docs/benchmarks.md and target/bench/results.json.

use std::process::Command;

use anyhow::{bail, Context, Result};

pub fn run(what: &str, quick: bool, smoke: bool) -> Result<()> {
    let agent = crate::build_agent()?;
    let bin = crate::build_bin("sg-bench", "sg-bench")?;
    let mut cmd = Command::new(bin);
    cmd.arg(what)
        .env("SG_AGENT_BIN", &agent)
        .env("SG_EBPF_BENCH_OBJECT", crate::bench_object())
        .current_dir(crate::root());
    if quick {
        cmd.arg("--quick");
    }
    if smoke {
        cmd.arg("--smoke");
    }
    let st = cmd.status().context("running sg-bench")?;
    if !st.success() {
        bail!("benchmark failed: {st}");
    }
    Ok(())
}
