//! The command line of SPEC §5. Machine output goes to stdout, logs and errors to stderr;
//! bad usage exits 64 before anything on the system is touched. One file per command
//! group: `run`, `check` (validate, explain), `inspect` (status, flows), `observe`
//! (policy, monitor), `diff`, `detach`.

#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

mod check;
mod detach;
mod diff;
mod inspect;
mod observe;
mod publish;
mod run;

pub use check::ExplainArgs;
pub use run::{Hook, LogFormat, RunArgs};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sg";

/// Exit code for bad usage (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// `--version`: the version, the commit and the embedded eBPF object.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SG_COMMIT"),
    ", eBPF object sha256 ",
    env!("SG_OBJECT_SHA256"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "sg-agent",
    version = LONG_VERSION,
    about = "AWS-style security groups enforced in the Linux kernel with eBPF",
    long_about = "sg-agent enforces EC2 security groups on this host's interfaces: it compiles the \
                  state file into BPF maps, attaches an ingress (XDP or TC) and a TC egress program \
                  to every interface whose MAC address is in the state, and keeps the maps equal \
                  to the state as it changes. Programs and maps stay in place when it exits.",
    after_help = "Logs go to stderr, machine output to stdout. RUST_LOG sets the log level \
                  (error, warn, info, debug, trace; default info); `run --log-format json` \
                  writes one JSON object per line. Bad usage exits 64."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load, attach and enforce the state; watch it for changes until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Check a state file: exit 0 when valid, else print every error and exit 1.
    Validate {
        /// State file (native TOML or AWS JSON).
        #[arg(long)]
        state: PathBuf,
        /// Print {"valid", "errors", "warnings"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Say whether the state allows a packet, and which rule allows it.
    Explain(ExplainArgs),
    /// What is enforced where, counters, last error, applied state checksum.
    Status {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The conntrack table as flows.
    Flows {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The effective policy per enforced interface, read back from the kernel's maps,
    /// rule by rule with stable ids and hit counters.
    Policy {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Only this interface.
        #[arg(long, value_name = "IFACE")]
        interface: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A live stream of flow events (admitted flows, denied packets) with the deciding
    /// group and rule or the drop reason, until interrupted. Needs the running agent.
    Monitor {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Only this interface.
        #[arg(long, value_name = "IFACE")]
        interface: Option<String>,
        /// Only denied (and audited) packets.
        #[arg(long)]
        drops: bool,
        /// One JSON object per event.
        #[arg(long)]
        json: bool,
    },
    /// What applying a new state would change, and which live flows it would cut; exit 0
    /// when nothing would change, 2 when something would.
    Diff {
        /// The new state file.
        #[arg(long)]
        state: PathBuf,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Publish a state file to etcd (SPEC §8): validate, then write only what differs,
    /// in guarded transactions.
    Publish(publish::PublishArgs),
    /// Print a shell completion script (bash, zsh or fish) to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout, built from these same definitions.
    Man,
    /// Remove every program, link and pin the agent made.
    Detach {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Detach only this interface (its programs; the maps stay).
        #[arg(long, value_name = "IFACE")]
        interface: Option<String>,
        /// Stop the agent that holds the pins (SIGTERM) and detach anyway.
        #[arg(long)]
        force: bool,
    },
}

/// Parses arguments; help and version exit 0, bad usage 64.
pub fn parse() -> Result<Cli, ExitCode> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) => {
            let _ = e.print();
            Err(if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Validate { state, json } => check::validate(&state, json),
        Command::Explain(args) => check::explain(&args),
        Command::Run(args) => run::run(args),
        Command::Status { pin_dir, json } => inspect::status(&pin_dir, json),
        Command::Flows { pin_dir, json } => inspect::flows(&pin_dir, json),
        Command::Policy {
            pin_dir,
            interface,
            json,
        } => observe::policy(&pin_dir, interface.as_deref(), json),
        Command::Monitor {
            pin_dir,
            interface,
            drops,
            json,
        } => observe::monitor(&pin_dir, interface.as_deref(), drops, json),
        Command::Diff {
            state,
            pin_dir,
            json,
        } => diff::diff(&state, &pin_dir, json),
        Command::Publish(args) => publish::publish(&args),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "sg-agent", &mut out);
            print_all(&out)
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            match clap_mangen::Man::new(cmd).render(&mut out) {
                Ok(()) => print_all(&out),
                Err(e) => {
                    eprintln!("sg-agent man: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Detach {
            pin_dir,
            interface,
            force,
        } => detach::detach(&pin_dir, interface.as_deref(), force),
    }
}

/// Writes generated text to stdout; a reader that went away (`| head`) is not an error.
fn print_all(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sg-agent: writing to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at RUST_LOG's level (info by default), as text or, for
/// `run --log-format json`, one JSON object per line.
pub fn init_logging(cli: &Cli) {
    let json = matches!(&cli.command, Command::Run(a) if a.log_format == LogFormat::Json);
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    builder.target(env_logger::Target::Stderr);
    if json {
        builder.format(|buf, record| {
            use std::io::Write;
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            let line = serde_json::json!({
                "ts": ts,
                "level": record.level().to_string().to_lowercase(),
                "target": record.target(),
                "message": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    builder.init();
}
