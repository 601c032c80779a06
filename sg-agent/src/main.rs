#![forbid(unsafe_code)]
//! sg-agent: a thin main; everything lives in the library.
use std::process::ExitCode;

fn main() -> ExitCode {
    match sg_agent::cli::parse() {
        Ok(cli) => {
            sg_agent::cli::init_logging(&cli);
            sg_agent::cli::main(cli)
        }
        Err(code) => code,
    }
}
