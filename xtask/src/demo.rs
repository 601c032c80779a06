use anyhow::Result;
use std::path::Path;
pub fn run(_agent: &Path, _keep: bool) -> Result<()> {
    anyhow::bail!("demo: not built yet")
}
