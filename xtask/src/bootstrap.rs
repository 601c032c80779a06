//! Everything the README's commands use, installed on demand: the system packages (apt),
//! rust-src for nightly, LLVM 22 and bpf-linker built against it. Idempotent; a no-op in
//! well under a second when all is present. `doctor` reports the toolchain and the host
//! with a verdict.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn has_nightly() -> bool {
    ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"]))
}

fn has_rust_src() -> bool {
    // The component's files, checked directly: much faster than asking rustup.
    output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
        .is_some_and(|sysroot| {
            Path::new(&sysroot)
                .join("lib/rustlib/src/rust/library/core")
                .is_dir()
        })
}

fn has_bpf_linker() -> bool {
    ok(Command::new("bpf-linker").arg("--version"))
}

fn has_llvm() -> bool {
    Path::new(LLVM_PREFIX).join("bin/llvm-config").exists()
}

/// The system packages the tasks use, each with a command that shows it is installed:
/// namespaces and veth (iproute2), holders of a host's namespaces and CPU placement
/// (util-linux), the peers benchmark's filters and load (nftables, iptables, iperf3,
/// ethtool), map memory (bpftool), and LLVM for bpf-linker.
const SYSTEM_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("util-linux", "nsenter"),
    ("procps", "sysctl"),
    ("nftables", "nft"),
    ("iptables", "iptables"),
    ("iperf3", "iperf3"),
    ("ethtool", "ethtool"),
    ("bpftool", "bpftool"),
    // `promtool check metrics` in the metrics test.
    ("prometheus", "promtool"),
    // The fleet tests' etcd (3.4; sg talks to its v3 JSON gateway, no protoc needed).
    ("etcd-server", "etcd"),
    // The TLS test: users and roles (etcdctl), and its CA and certificates (openssl).
    ("etcd-client", "etcdctl"),
    ("openssl", "openssl"),
    // The unit under a real systemd: a Debian root booted with systemd-nspawn.
    ("debootstrap", "debootstrap"),
    ("systemd-container", "systemd-nspawn"),
    ("systemd", "systemd-analyze"),
];

/// Whether `command` is on the PATH (or in the sbin directories root's PATH may lack).
fn has_command(command: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(Into::into))
        .any(|dir| dir.join(command).is_file())
}

/// The system packages that are missing.
fn missing_packages() -> Vec<&'static str> {
    let mut missing: Vec<&str> = SYSTEM_PACKAGES
        .iter()
        .filter(|(_, command)| !has_command(command))
        .map(|(package, _)| *package)
        .collect();
    if !has_llvm() {
        missing.push("llvm-22-dev");
    }
    missing.dedup();
    missing
}

fn apt(packages: &[&str]) -> Result<()> {
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "no apt-get on this host; install by hand:\n  \
             LLVM 22 development files (llvm-config at {LLVM_PREFIX}/bin)\n  \
             rustup component add rust-src --toolchain nightly\n  \
             LLVM_PREFIX={LLVM_PREFIX} LLVM_SYS_221_PREFIX={LLVM_PREFIX} cargo install bpf-linker --locked --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22"
        );
    }
    eprintln!("xtask: installing {} with apt-get", packages.join(" "));
    let run = |args: &[&str]| -> Result<()> {
        let st = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !st.success() {
            bail!("apt-get {} failed", args.join(" "));
        }
        Ok(())
    };
    let install = [
        &["install", "-y", "-q", "--no-install-recommends"],
        packages,
    ]
    .concat();
    // A fresh machine has no package lists yet: fetch them first (once); with lists,
    // fetch them again only when the install fails on stale ones.
    let has_lists = std::fs::read_dir("/var/lib/apt/lists")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with("_Packages"));
    if !has_lists {
        run(&["update", "-q"])?;
    }
    if run(&install).is_err() {
        run(&["update", "-q"])?;
        run(&install)?;
    }
    Ok(())
}

/// Installs whatever the tasks lack, saying what it does.
/// A Debian root with systemd for the unit's test under a real systemd (systemd-nspawn),
/// made once with debootstrap from the host's own Debian release and mirror, and kept in
/// target/ (the tests boot copies of it).
pub fn container_root() -> Result<std::path::PathBuf> {
    let root = crate::root().join("target/nspawn-root");
    if root.join("usr/lib/systemd/systemd").exists() {
        return Ok(root);
    }
    let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let suite = release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .unwrap_or("bookworm")
        .trim_matches('"')
        .to_string();
    let sources =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let mirror = sources
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .map(|u| u.split_whitespace().next().unwrap_or("").to_string())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "http://deb.debian.org/debian".into());
    eprintln!("xtask: making a Debian {suite} root with systemd for the unit's test (debootstrap, about 30 s)");
    let tmp = crate::root().join("target/nspawn-root.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let st = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus,iproute2,procps",
            &suite,
        ])
        .arg(&tmp)
        .arg(&mirror)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !st.success() {
        bail!("debootstrap {suite} from {mirror} failed");
    }
    std::fs::rename(&tmp, &root)?;
    Ok(root)
}

pub fn ensure() -> Result<()> {
    let missing = missing_packages();
    if !missing.is_empty() {
        apt(&missing)?;
    }
    if !has_nightly() {
        bail!("the nightly toolchain is missing: rustup toolchain install nightly --component rust-src");
    }
    if !has_rust_src() {
        eprintln!("xtask: adding rust-src to the nightly toolchain");
        let st = Command::new("rustup")
            .args(["component", "add", "rust-src", "--toolchain", "nightly"])
            .status()?;
        if !st.success() {
            bail!("rustup component add rust-src --toolchain nightly failed");
        }
    }
    if !has_bpf_linker() {
        eprintln!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        );
        let st = Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .status()?;
        if !st.success() {
            bail!("cargo install bpf-linker failed");
        }
    }
    Ok(())
}

fn line(what: &str, good: bool, detail: &str) -> bool {
    println!("{} {what:<22} {detail}", if good { "ok  " } else { "FAIL" });
    good
}

pub fn doctor() -> Result<()> {
    let mut all = true;
    let nightly = output(Command::new("rustup").args(["run", "nightly", "rustc", "--version"]));
    all &= line(
        "nightly toolchain",
        nightly.is_some(),
        nightly
            .as_deref()
            .unwrap_or("missing: rustup toolchain install nightly"),
    );
    all &= line(
        "rust-src (nightly)",
        has_rust_src(),
        "needed for -Z build-std=core",
    );
    let linker = output(Command::new("bpf-linker").arg("--version"));
    all &= line(
        "bpf-linker",
        linker.is_some(),
        linker
            .as_deref()
            .unwrap_or("missing: cargo xtask bootstrap"),
    );
    let release = output(Command::new("uname").arg("-r")).unwrap_or_default();
    let (major, minor) = {
        let mut it = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u32>().ok());
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    all &= line("kernel >= 5.15", (major, minor) >= (5, 15), &release);
    all &= line(
        "BTF",
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "/sys/kernel/btf/vmlinux",
    );
    let root = output(Command::new("id").arg("-u")).as_deref() == Some("0");
    all &= line(
        "root",
        root,
        "loading BPF and building namespaces need root (or CAP_BPF+CAP_NET_ADMIN+CAP_SYS_ADMIN)",
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let bpffs = mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"));
    line(
        "bpffs",
        true,
        if bpffs {
            "mounted"
        } else {
            "not mounted (the agent mounts it at /sys/fs/bpf itself)"
        },
    );
    for (package, command) in SYSTEM_PACKAGES {
        all &= line(
            package,
            has_command(command),
            if has_command(command) {
                command
            } else {
                "missing: cargo xtask bootstrap installs it"
            },
        );
    }
    println!(
        "\nverdict: {}",
        if all {
            "ready"
        } else {
            "not ready (see FAIL lines; `cargo xtask bootstrap` installs the toolchain)"
        }
    );
    if !all {
        bail!("doctor found problems");
    }
    Ok(())
}
