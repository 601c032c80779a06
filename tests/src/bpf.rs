//! Running the real loaded programs on crafted frames with BPF_PROG_TEST_RUN.

use aya::programs::{TestRun, TestRunOptions};
use sg_agent::{
    compile::{compile, LocalInterface, Options, Plan},
    datapath::{Datapath, MapSizes},
    model::State,
};
use sg_common::{GlobalConfig, PROG_TC_EGRESS, PROG_TC_INGRESS};

/// Where a frame enters the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    TcIngress,
    TcEgress,
}

impl Hook {
    pub const INGRESS: [Hook; 2] = [Hook::Xdp, Hook::TcIngress];
}

/// The loopback device of the test's network namespace: BPF_PROG_TEST_RUN runs frames as
/// if they arrived on (XDP) or passed through (TC) it unless told another ifindex.
pub const LO: u32 = 1;

/// Loaded programs and maps, and the plan they hold.
pub struct Bpf {
    pub dp: Datapath,
    pub plan: Plan,
}

impl Bpf {
    pub fn load(sizes: &MapSizes) -> Bpf {
        let dp = Datapath::load(sizes).unwrap_or_else(|e| panic!("loading the datapath: {e:?}"));
        // As the agent does once it has attached: every test runs with the filter trusted.
        dp.refresh_seen()
            .unwrap_or_else(|e| panic!("refreshing the presence filter: {e:?}"));
        Bpf {
            dp,
            plan: Plan::default(),
        }
    }

    /// Loads and programs `state` for `locals`.
    pub fn with_state(state: &State, locals: &[LocalInterface], sizes: &MapSizes) -> Bpf {
        let mut bpf = Bpf::load(sizes);
        bpf.program(state, locals, &Options::default());
        bpf
    }

    /// Reprograms the maps for a new state, through the ordered diff.
    pub fn program(&mut self, state: &State, locals: &[LocalInterface], options: &Options) {
        let new = compile(state, locals, options, Some(&self.plan));
        let ops = sg_agent::compile::diff(&self.plan, &new);
        self.dp
            .apply(&ops)
            .unwrap_or_else(|e| panic!("applying plan: {e:?}"));
        self.plan = new;
    }

    /// Runs `frame` through a hook on `ifindex`; true when it passes.
    pub fn run_on(&mut self, hook: Hook, ifindex: u32, frame: &[u8]) -> bool {
        self.run_raw(hook, ifindex, frame, 1).0
    }

    pub fn run(&mut self, hook: Hook, frame: &[u8]) -> bool {
        self.run_on(hook, LO, frame)
    }

    /// Runs `frame` `repeat` times; returns the verdict and the mean ns per run.
    pub fn run_raw(&mut self, hook: Hook, ifindex: u32, frame: &[u8], repeat: u32) -> (bool, f64) {
        self.try_run_raw(hook, ifindex, frame, repeat)
            .unwrap_or_else(|e| {
                panic!(
                    "BPF_PROG_TEST_RUN on {hook:?} ({} bytes): {e:?}",
                    frame.len()
                )
            })
    }

    /// As `run_raw`, but returns the kernel's refusal (the skb test run rejects frames
    /// whose IP header is not whole before the program even runs).
    pub fn try_run_raw(
        &mut self,
        hook: Hook,
        ifindex: u32,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(bool, f64), aya::programs::ProgramError> {
        let mut ctx = [0u8; 44];
        let result = match hook {
            Hook::Xdp => {
                // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index.
                ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
                ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
                let opts = TestRunOptions {
                    data_in: Some(frame),
                    // Loopback's receive queue is not registered for XDP: give no context
                    // and the kernel runs the frame as received on loopback.
                    ctx_in: if ifindex == LO {
                        None
                    } else {
                        Some(&ctx[..24])
                    },
                    repeat,
                    ..TestRunOptions::default()
                };
                self.dp.xdp_ingress().expect("xdp program").test_run(opts)
            }
            Hook::TcIngress | Hook::TcEgress => {
                // struct __sk_buff: ifindex at offset 40.
                ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
                let opts = TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(&ctx),
                    repeat,
                    ..TestRunOptions::default()
                };
                let name = if hook == Hook::TcIngress {
                    PROG_TC_INGRESS
                } else {
                    PROG_TC_EGRESS
                };
                self.dp.tc(name).expect("tc program").test_run(opts)
            }
        }?;
        let pass = match hook {
            Hook::Xdp => match result.return_value {
                2 => true,
                1 => false,
                other => panic!("unexpected XDP action {other}"),
            },
            _ => match result.return_value {
                0 => true,
                2 => false,
                other => panic!("unexpected TC action {other}"),
            },
        };
        Ok((pass, result.duration.as_nanos() as f64))
    }

    /// Moves the datapath's clock forward (expires flows without sleeping).
    pub fn advance_clock(&mut self, secs: u64) {
        let mut g: GlobalConfig = self.dp.global().expect("global config");
        g.clock_offset_ns += secs * 1_000_000_000;
        self.dp.set_global(g).expect("set global config");
    }

    pub fn counter(&mut self, ifindex: u32, direction: u8, slot: u32) -> u64 {
        let c = self.dp.tables().counters(ifindex).expect("counters");
        c.v[sg_common::Counters::index(direction, slot)]
    }
}

/// What happened to one frame: passed, or dropped with the reason the datapath counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// Dropped; `sg_common::drop_reason` code (0 when no drop counter moved: a bug).
    Drop(u32),
}

impl Bpf {
    /// Runs `frame` on loopback and says whether it passed or which drop reason it was
    /// counted under; Err when the kernel refuses to run the frame at all.
    pub fn outcome(
        &mut self,
        hook: Hook,
        frame: &[u8],
    ) -> Result<Outcome, aya::programs::ProgramError> {
        let dir = if hook == Hook::TcEgress {
            sg_common::DIR_EGRESS
        } else {
            sg_common::DIR_INGRESS
        };
        let drops = |bpf: &mut Bpf| -> Vec<u64> {
            (1..sg_common::drop_reason::COUNT)
                .map(|r| bpf.counter(LO, dir, sg_common::counter::drop_slot(r)))
                .collect()
        };
        let before = drops(self);
        let (pass, _) = self.try_run_raw(hook, LO, frame, 1)?;
        if pass {
            return Ok(Outcome::Pass);
        }
        let after = drops(self);
        let reason = (1..sg_common::drop_reason::COUNT)
            .zip(before.iter().zip(&after))
            .find(|(_, (b, a))| a > b)
            .map_or(0, |(r, _)| r);
        Ok(Outcome::Drop(reason))
    }
}

impl Bpf {
    /// Runs (hook, frame, passes) steps in order on one conntrack table, naming the
    /// failing step.
    pub fn sequence(&mut self, name: &str, steps: &[(Hook, crate::packet::Spec, bool)]) {
        for (i, (hook, spec, pass)) in steps.iter().enumerate() {
            assert_eq!(
                self.run(*hook, &spec.build()),
                *pass,
                "{name}: step {i} ({hook:?} {:?})",
                spec.l4
            );
        }
    }
}
