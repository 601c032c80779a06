//! The benchmark-only eBPF object (`sg-ebpf-bench`): the floors of the datapath benchmark
//! and the live-frames traffic generator. No agent loads it; `cargo xtask bench` builds it
//! beside the enforcing object and names it in `SG_EBPF_BENCH_OBJECT`.

use std::path::PathBuf;

use aya::{programs::Xdp, Ebpf};
use sg_common::{PROG_BENCH_DROP, PROG_BENCH_EMPTY, PROG_BENCH_HASH, PROG_GEN};

pub struct BenchObject {
    ebpf: Ebpf,
}

fn path() -> PathBuf {
    std::env::var_os("SG_EBPF_BENCH_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bpfel-unknown-none/release/sg-ebpf-bench")
        })
}

impl BenchObject {
    /// Loads the object and its three programs; panics with the path when it cannot.
    pub fn load() -> BenchObject {
        let path = path();
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "reading the benchmark object {}: {e} (cargo xtask build-ebpf builds it)",
                path.display()
            )
        });
        let mut ebpf = Ebpf::load(&bytes)
            .unwrap_or_else(|e| panic!("loading the benchmark object {}: {e}", path.display()));
        for name in [PROG_BENCH_EMPTY, PROG_BENCH_HASH, PROG_BENCH_DROP, PROG_GEN] {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("{name} is missing from {}", path.display()))
                .try_into()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            p.load().unwrap_or_else(|e| panic!("loading {name}: {e}"));
        }
        BenchObject { ebpf }
    }

    pub fn xdp(&mut self, name: &str) -> &mut Xdp {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .unwrap_or_else(|| panic!("program {name}"))
    }

    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}
