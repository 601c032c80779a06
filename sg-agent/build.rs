//! Embeds the eBPF object into the agent, and names the build for `--version`.
//! `cargo xtask build` compiles sg-ebpf and points `SG_EBPF_OBJECT` at it; without it
//! (plain `cargo check`, `cargo clippy`) an empty stub is embedded and the agent explains
//! how to build the real one when asked to load it. `SG_COMMIT` is the git commit the
//! agent was built from (`SG_COMMIT` in the environment wins, for builds outside a
//! checkout), `SG_OBJECT_SHA256` the embedded object's hash.
use std::{env, fs, path::PathBuf, process::Command};

use sha2::{Digest, Sha256};

fn main() {
    println!("cargo:rerun-if-env-changed=SG_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=SG_COMMIT");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("sg-ebpf.o");
    match env::var("SG_EBPF_OBJECT") {
        Ok(path) if !path.is_empty() => {
            println!("cargo:rerun-if-changed={path}");
            fs::copy(&path, &out).unwrap_or_else(|e| panic!("copying eBPF object {path}: {e}"));
        }
        _ => fs::write(&out, []).expect("writing the stub eBPF object"),
    }
    let object = fs::read(&out).expect("reading the embedded object");
    let sha: String = if object.is_empty() {
        "none (built without the eBPF object)".into()
    } else {
        Sha256::digest(&object)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    println!("cargo:rustc-env=SG_OBJECT_SHA256={sha}");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let git_dir = manifest.join("../.git");
    if git_dir.exists() {
        println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
        println!("cargo:rerun-if-changed={}", git_dir.join("refs").display());
    }
    let commit = env::var("SG_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .current_dir(&manifest)
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        });
    println!(
        "cargo:rustc-env=SG_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}
