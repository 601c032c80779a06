#![forbid(unsafe_code)]
//! sg-agent: a thin main; everything lives in the library.
use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    match sg_agent::cli::parse() {
        Ok(cli) => sg_agent::cli::main(cli),
        Err(code) => code,
    }
}
