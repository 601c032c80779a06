//! The test harness that sg's integration tests build on:
//! - `privileges`: root, bpffs and namespaces are required; in CI (`CI=true`) a test that
//!   lacks them fails, elsewhere it says why it cannot run;
//! - `netns`: uniquely named network namespaces, veth pairs and bridges, removed on drop
//!   even when the test panics; sockets and commands inside a namespace;
//! - `packet`: crafted Ethernet frames for BPF_PROG_TEST_RUN;
//! - `bpf`: running the real loaded programs on frames;
//! - `wait_for`: conditions with a deadline instead of sleeps.

pub mod bpf;
pub mod etcd;
pub mod fixtures;
pub mod fuzz;
pub mod lab;
pub mod netns;
pub mod packet;
pub mod privileges;

use std::time::{Duration, Instant};

/// A randomized test's seed: `SG_SEED` when set (to reproduce a failure), else the clock.
pub fn seed() -> u64 {
    std::env::var("SG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Polls `cond` until it returns `Some`, or panics with `what` after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
