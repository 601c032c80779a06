//! CPU placement: the server's receive processing in a threaded NAPI thread on a core of
//! its own, the generator elsewhere, and CPU time of threads and programs.

use super::*;

/// The last CPU, where receive processing runs; the generator runs on the others.
pub(crate) fn receive_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
}

/// Pids of the threaded-NAPI kernel threads of every `eth0`.
pub(crate) fn napi_threads() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.starts_with("napi/eth0-"))
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// CPU time the threads have run, in ns (the first field of schedstat).
pub(crate) fn cpu_ns(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Moves kernel threads to `receive_cpu`, with the real-time priority a NIC's softirq
/// processing has over processes.
pub(crate) fn pin_to_receive_cpu(threads: &[u32]) {
    let cpu = receive_cpu();
    if cpu == 0 {
        return;
    }
    for pid in threads.iter().map(u32::to_string) {
        let _ = Command::new("taskset")
            .args(["-p", "-c", &cpu.to_string(), &pid])
            .output();
        let _ = Command::new("chrt").args(["-f", "-p", "50", &pid]).output();
    }
}

/// Keeps the calling thread off `receive_cpu`.
pub(crate) fn avoid_receive_cpu() {
    let cpu = receive_cpu();
    if cpu == 0 {
        return;
    }
    // SAFETY: a CPU set on the stack, applied to the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in 0..cpu {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Total run time (ns) and runs of the loaded programs named `name` (kernel BPF
/// statistics, switched on for the benchmark).
pub(crate) fn prog_stats(name: &str) -> (u64, u64) {
    let Ok(out) = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
    else {
        return (0, 0);
    };
    let progs: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"].as_str() == Some(name))
        .fold((0, 0), |(t, n), p| {
            (
                t + p["run_time_ns"].as_u64().unwrap_or(0),
                n + p["run_cnt"].as_u64().unwrap_or(0),
            )
        })
}
