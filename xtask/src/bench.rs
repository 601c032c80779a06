use anyhow::Result;
pub fn run(_what: &str, _quick: bool, _smoke: bool) -> Result<()> {
    anyhow::bail!("bench: not built yet")
}
