//! Embeds the eBPF object into the agent. `cargo xtask build` compiles sg-ebpf and points
//! `SG_EBPF_OBJECT` at it; without it (plain `cargo check`, `cargo clippy`) an empty stub
//! is embedded and the agent explains how to build the real one when asked to load it.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=SG_EBPF_OBJECT");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("sg-ebpf.o");
    match env::var("SG_EBPF_OBJECT") {
        Ok(path) if !path.is_empty() => {
            println!("cargo:rerun-if-changed={path}");
            fs::copy(&path, &out).unwrap_or_else(|e| panic!("copying eBPF object {path}: {e}"));
        }
        _ => fs::write(&out, []).expect("writing the stub eBPF object"),
    }
}
