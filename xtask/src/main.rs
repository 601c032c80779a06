//! Developer tasks: toolchain bootstrap, building the eBPF object and the agent, running,
//! testing, the demo and the benchmarks. `cargo xtask --help`.

mod bench;
mod bootstrap;
mod demo;
mod package;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "sg developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Report toolchain, kernel, BTF, bpffs and privileges, with a verdict.
    Doctor,
    /// Install what the eBPF build needs (rust-src, LLVM 22, bpf-linker) if missing.
    Bootstrap,
    /// Build the eBPF object (target/bpfel-unknown-none/release/sg-ebpf).
    BuildEbpf,
    /// Build the release agent with the eBPF object embedded (target/release/sg-agent).
    Build,
    /// Build and run the agent in this VM: cargo xtask run -- run --state FILE ...
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit, property, BPF_PROG_TEST_RUN and namespace tests.
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build a two-tier lab in network namespaces, enforce it, and verify it with traffic.
    Demo {
        /// Leave the lab up for exploring.
        #[arg(long)]
        keep: bool,
        /// Every server's agent follows one etcd; web3's launch is one publish --merge.
        #[arg(long)]
        etcd: bool,
    },
    /// Build the Debian package (target/debian/sg-agent_VERSION_ARCH.deb) with dpkg-deb.
    Package,
    /// The differential fuzz campaign of the datapath against the reference model of
    /// SPEC §1–§2 (tests/src/fuzz.rs): a million frames unless --frames says otherwise.
    Fuzz {
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// Reproduces a campaign (default: from the clock).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Benchmarks: compile, datapath (all with --quick/--smoke variants).
    Bench {
        /// What to measure: all, compile, datapath.
        #[arg(default_value = "all")]
        what: String,
        /// A run under 5 minutes.
        #[arg(long)]
        quick: bool,
        /// Seconds, one repetition: keeps the harness from rotting (CI).
        #[arg(long)]
        smoke: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Doctor => bootstrap::doctor(),
        Task::Bootstrap => bootstrap::ensure(),
        Task::BuildEbpf => build_ebpf().map(|_| ()),
        Task::Build => build_agent().map(|_| ()),
        Task::Run { args } => run(&args),
        Task::Test { args } => test(&args),
        Task::Demo { keep, etcd } => build_agent().and_then(|agent| demo::run(&agent, keep, etcd)),
        Task::Package => build_agent()
            .and_then(|agent| package::build(&agent))
            .map(|_| ()),
        Task::Bench { what, quick, smoke } => bench::run(&what, quick, smoke),
        Task::Fuzz { frames, seed } => fuzz(frames, seed),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn ebpf_object() -> PathBuf {
    root().join("target/bpfel-unknown-none/release/sg-ebpf")
}

/// The benchmark-only object (floors and the traffic generator), built beside it.
pub fn bench_object() -> PathBuf {
    root().join("target/bpfel-unknown-none/release/sg-ebpf-bench")
}

fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("running {shown}"))?;
    if !st.success() {
        bail!("{shown} failed: {st}");
    }
    Ok(())
}

/// Builds the eBPF object with the nightly toolchain and bpf-linker.
pub fn build_ebpf() -> Result<PathBuf> {
    bootstrap::ensure()?;
    eprintln!("xtask: building the eBPF object");
    status(
        Command::new("cargo")
            .current_dir(root())
            .args([
                "+nightly",
                "build",
                "--locked",
                "-p",
                "sg-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
            ])
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CARGO_ENCODED_RUSTFLAGS"),
    )?;
    Ok(ebpf_object())
}

/// Builds the release agent with the object embedded; returns its path.
pub fn build_agent() -> Result<PathBuf> {
    let object = build_ebpf()?;
    eprintln!("xtask: building sg-agent (release)");
    status(
        Command::new("cargo")
            .current_dir(root())
            .args(["build", "--locked", "--release", "-p", "sg-agent"])
            .env("SG_EBPF_OBJECT", &object),
    )?;
    Ok(root().join("target/release/sg-agent"))
}

/// Builds a binary of a workspace crate (the demo in sg-tests, sg-bench) with the eBPF
/// object, so it shares the test build's artifacts.
/// `cargo xtask fuzz`: builds the campaign's runner (with the eBPF object) and runs it.
fn fuzz(frames: u64, seed: Option<u64>) -> Result<()> {
    bootstrap::ensure()?;
    let bin = build_bin("sg-tests", "sg-fuzz")?;
    let mut cmd = Command::new(bin);
    cmd.args(["--frames", &frames.to_string()]);
    if let Some(s) = seed {
        cmd.args(["--seed", &s.to_string()]);
    }
    status(&mut cmd)
}

pub fn build_bin(package: &str, name: &str) -> Result<PathBuf> {
    let object = build_ebpf()?;
    status(
        Command::new("cargo")
            .current_dir(root())
            .args([
                "build",
                "--locked",
                "--release",
                "-p",
                package,
                "--bin",
                name,
            ])
            .env("SG_EBPF_OBJECT", &object),
    )?;
    Ok(root().join("target/release").join(name))
}

fn run(args: &[String]) -> Result<()> {
    let agent = build_agent()?;
    let st = Command::new(&agent)
        .args(args)
        .status()
        .context("running sg-agent")?;
    if !st.success() {
        bail!("sg-agent exited with {st}");
    }
    Ok(())
}

/// Runs the whole test suite with the real eBPF object and prints one summary line.
fn test(args: &[String]) -> Result<()> {
    let object = build_ebpf()?;
    let agent = build_agent()?;
    // The package test installs the real .deb, also in a container under a real systemd.
    let deb = package::build(&agent)?;
    let container_root = bootstrap::container_root()?;
    eprintln!("xtask: running the tests");
    let started = std::time::Instant::now();
    let output = Command::new("cargo")
        .current_dir(root())
        .args([
            "test",
            "--locked",
            "--release",
            "--workspace",
            "--exclude",
            "sg-ebpf",
            "--no-fail-fast",
            "--",
        ])
        .args(args)
        .env("SG_EBPF_OBJECT", &object)
        .env("SG_AGENT_BIN", &agent)
        .env("SG_DEB", &deb)
        .env("SG_CONTAINER_ROOT", &container_root)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?
        .wait_with_output()?;
    let out = String::from_utf8_lossy(&output.stdout);
    print!("{out}");
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in out.lines().filter(|l| l.starts_with("test result:")) {
        let num = |word: &str| -> u64 {
            line.split(';')
                .filter_map(|part| {
                    let toks: Vec<&str> = part.split_whitespace().collect();
                    let i = toks.iter().position(|t| *t == word)?;
                    toks.get(i.checked_sub(1)?)?.parse().ok()
                })
                .next()
                .unwrap_or(0)
        };
        passed += num("passed");
        failed += num("failed");
        ignored += num("ignored");
    }
    println!(
        "\nsg test summary: {} in {:.0?}\n{passed} passed, {failed} failed, {ignored} skipped",
        if output.status.success() && failed == 0 {
            "ok"
        } else {
            "FAILED"
        },
        started.elapsed()
    );
    if !output.status.success() || failed > 0 {
        bail!("tests failed");
    }
    Ok(())
}
