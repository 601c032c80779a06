//! `cargo xtask demo`: builds the demo (with the agent it drives) and runs it.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

pub fn run(agent: &Path, keep: bool, etcd: bool) -> Result<()> {
    let bin = crate::build_bin("sg-tests", "sg-demo")?;
    let mut cmd = Command::new(bin);
    cmd.env("SG_AGENT_BIN", agent);
    if keep {
        cmd.arg("--keep");
    }
    if etcd {
        cmd.arg("--etcd");
    }
    let st = cmd.status().context("running the demo")?;
    if !st.success() {
        bail!("the demo found mismatches");
    }
    Ok(())
}
