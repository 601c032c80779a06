//! `bench datapath`: ns per packet in sg's programs (BPF_PROG_TEST_RUN), beside the floors
//! of the benchmark object, at every scale.

use std::collections::BTreeMap;

use aya::programs::{TestRun, TestRunOptions};
use serde_json::json;
use sg_agent::{compile::LocalInterface, datapath::MapSizes, source::parse_str, testgen::Rng};
use sg_common::{PROG_BENCH_EMPTY, PROG_BENCH_HASH};
use sg_tests::{
    bpf::{Bpf, Hook, LO},
    packet::{tcp, TH_ACK, TH_RST, TH_SYN},
};

use crate::{object::BenchObject, report::*, scale, Mode};

pub(crate) struct Dp {
    bpf: Bpf,
    floors: BenchObject,
}

impl Dp {
    /// Mean ns per run of one frame repeated `repeat` times.
    fn repeated(&mut self, frame: &[u8], repeat: u32) -> f64 {
        self.bpf.run_raw(Hook::Xdp, LO, frame, repeat).1
    }

    fn floor(&mut self, name: &'static str, frame: &[u8], repeat: u32) -> f64 {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        };
        let r = self.floors.xdp(name).test_run(opts).expect("test run");
        r.duration.as_nanos() as f64
    }
}

pub(crate) fn member(i: u32, v6: bool) -> String {
    if v6 {
        scale::member_v6(i).to_string()
    } else {
        scale::member_v4(i).to_string()
    }
}

pub(crate) fn bench_datapath(mode: Mode) {
    let (scales, repeat, calls, reps): (&[u32], u32, u32, usize) = match mode {
        Mode::Smoke => (&[10, 1000], 2000, 200, 1),
        Mode::Quick => (&[10, 1000, 10_000, 100_000], 50_000, 1000, 3),
        Mode::Full => (&[10, 1000, 10_000, 100_000], 500_000, 5000, 5),
    };
    let me4 = "198.19.255.254";
    let me6 = "2001:db8:ff::1";
    // rows: (case, family, mode) → per scale Stat
    let mut table: BTreeMap<(String, &str, &str), Vec<Stat>> = BTreeMap::new();
    let mut floors: Vec<(String, Stat)> = vec![];
    for &n in scales {
        let state = parse_str(&scale::state_text(n, n)).expect("state");
        let sizes = MapSizes {
            conntrack: 262_144,
            conntrack_new: 262_144,
            addresses: 2 * n + 1024,
            networks: 1024,
            ports: 2 * n + 1024,
            interfaces: 16,
            rules: n + 1024,
            fragments: 1024,
        };
        let mut dp = Dp {
            bpf: Bpf::with_state(
                &state,
                &[LocalInterface {
                    ifindex: LO,
                    eni: "eni-srv".into(),
                }],
                &sizes,
            ),
            floors: BenchObject::load(),
        };
        let mut rng = Rng::new(n as u64);
        let mut samples: BTreeMap<(String, &str, &str), Vec<f64>> = BTreeMap::new();
        for _ in 0..reps {
            for v6 in [false, true] {
                let fam = if v6 { "IPv6" } else { "IPv4" };
                let me = if v6 { me6 } else { me4 };
                // Conntrack hit: an established flow's packet.
                let peer = member(1, v6);
                dp.bpf
                    .run(Hook::Xdp, &tcp(&peer, me, 40000, 3306, TH_SYN).build());
                dp.bpf.run(
                    Hook::TcEgress,
                    &tcp(me, &peer, 3306, 40000, TH_SYN | TH_ACK).build(),
                );
                let ack = tcp(&peer, me, 40000, 3306, TH_ACK).build();
                assert!(dp.bpf.run(Hook::Xdp, &ack));
                samples
                    .entry(("conntrack hit".into(), fam, "repeated"))
                    .or_default()
                    .push(dp.repeated(&ack, repeat));
                // Miss then allow, repeated: a reset from a member (policy, no flow opened).
                let rst = tcp(&peer, me, 40001, 3306, TH_RST).build();
                assert!(dp.bpf.run(Hook::Xdp, &rst));
                samples
                    .entry(("miss → allow".into(), fam, "repeated"))
                    .or_default()
                    .push(dp.repeated(&rst, repeat));
                // Miss then deny, repeated: a member to a port it may not use.
                let deny = tcp(&peer, me, 40001, 3307, TH_SYN).build();
                assert!(!dp.bpf.run(Hook::Xdp, &deny));
                samples
                    .entry(("miss → deny".into(), fam, "repeated"))
                    .or_default()
                    .push(dp.repeated(&deny, repeat));
                // Random members (cold caches), one run each.
                let mut hit_frames = vec![];
                for _ in 0..calls.min(2000) {
                    let p = member(rng.below(n as u64) as u32, v6);
                    let port = 1024 + rng.below(60_000) as u16;
                    dp.bpf
                        .run(Hook::Xdp, &tcp(&p, me, port, 3306, TH_SYN).build());
                    dp.bpf.run(
                        Hook::TcEgress,
                        &tcp(me, &p, 3306, port, TH_SYN | TH_ACK).build(),
                    );
                    hit_frames.push(tcp(&p, me, port, 3306, TH_ACK).build());
                }
                let mut total = 0.0;
                for i in 0..calls {
                    let f = &hit_frames[rng.below(hit_frames.len() as u64) as usize];
                    let _ = i;
                    total += dp.repeated(f, 1);
                }
                samples
                    .entry(("conntrack hit".into(), fam, "random"))
                    .or_default()
                    .push(total / calls as f64);
                let mut total = 0.0;
                for _ in 0..calls {
                    let p = member(rng.below(n as u64) as u32, v6);
                    let port = 1024 + rng.below(60_000) as u16;
                    total += dp.repeated(&tcp(&p, me, port, 3306, TH_SYN).build(), 1);
                }
                samples
                    .entry(("miss → allow (opens flow)".into(), fam, "random"))
                    .or_default()
                    .push(total / calls as f64);
                let mut total = 0.0;
                for _ in 0..calls {
                    let p = member(rng.below(n as u64) as u32, v6);
                    total += dp.repeated(&tcp(&p, me, 40001, 3307, TH_SYN).build(), 1);
                }
                samples
                    .entry(("miss → deny".into(), fam, "random"))
                    .or_default()
                    .push(total / calls as f64);
                dp.bpf.dp.flush_flows().unwrap();
            }
        }
        for (k, v) in samples {
            table.entry(k).or_default().push(stat(v));
        }
        // Floors at this scale: the empty program, and a plain hash map of the same N keys.
        {
            let mut bench: aya::maps::HashMap<&mut aya::maps::MapData, u32, u32> =
                aya::maps::HashMap::try_from(
                    dp.floors
                        .ebpf()
                        .map_mut(sg_common::MAP_BENCH)
                        .expect("SG_BENCH"),
                )
                .expect("hash map");
            for i in 0..n {
                bench
                    .insert(u32::from_ne_bytes(scale::member_v4(i).octets()), 1, 0)
                    .expect("filling SG_BENCH");
            }
        }
        let frame = tcp(&member(1, false), me4, 40000, 3306, TH_ACK).build();
        let mut floor_samples: BTreeMap<(String, &str, &str), Vec<f64>> = BTreeMap::new();
        for _ in 0..reps {
            floor_samples
                .entry(("floor: empty XDP program".into(), "-", "repeated"))
                .or_default()
                .push(dp.floor(PROG_BENCH_EMPTY, &frame, repeat));
            floor_samples
                .entry(("floor: plain hash lookup".into(), "-", "repeated"))
                .or_default()
                .push(dp.floor(PROG_BENCH_HASH, &frame, repeat));
            let e1 = (0..calls)
                .map(|_| dp.floor(PROG_BENCH_EMPTY, &frame, 1))
                .sum::<f64>()
                / calls as f64;
            floor_samples
                .entry(("floor: empty XDP program".into(), "-", "random"))
                .or_default()
                .push(e1);
            let h1 = (0..calls)
                .map(|_| {
                    let f = tcp(
                        &member(rng.below(n as u64) as u32, false),
                        me4,
                        40000,
                        3306,
                        TH_ACK,
                    )
                    .build();
                    dp.floor(PROG_BENCH_HASH, &f, 1)
                })
                .sum::<f64>()
                / calls as f64;
            floor_samples
                .entry(("floor: plain hash lookup".into(), "-", "random"))
                .or_default()
                .push(h1);
        }
        for (k, v) in floor_samples {
            table.entry(k).or_default().push(stat(v));
        }
        floors.clear();
    }
    let header: Vec<String> = scales.iter().map(|n| format!("{n}")).collect();
    let mut md = format!(
        "## Datapath (`cargo xtask bench datapath`)\n\n\
         ns per packet through the XDP ingress program with BPF_PROG_TEST_RUN, N rules and N\n\
         group members (all programmed by the real compiler). *repeated*: one packet run\n\
         {repeat} times; *random*: {calls} packets, each from a member drawn at random (cold\n\
         caches), run once each, so their figures include the per-run overhead of the test\n\
         harness (the *random* floor of the empty program). Median of {reps} (min–max in results.json).\n\n\
         | case | family | packets | {} | {}/{} |\n| --- | --- | --- |{}---: |\n",
        header.join(" | "),
        scales[scales.len() - 1],
        scales[0],
        " ---: |".repeat(scales.len())
    );
    let mut results = vec![];
    for ((case, fam, m), stats) in &table {
        let cells: Vec<String> = stats.iter().map(|s| format!("{:.0}", s.median)).collect();
        let ratio = stats[stats.len() - 1].median / stats[0].median;
        md += &format!(
            "| {case} | {fam} | {m} | {} | {ratio:.2} |\n",
            cells.join(" | ")
        );
        results.push(json!({ "case": case, "family": fam, "packets": m, "scales": scales,
            "ns": stats.iter().map(|s| stat_json(*s, "ns")).collect::<Vec<_>>(), "ratio_largest_to_smallest": ratio }));
    }
    let hit = table
        .get(&("conntrack hit".to_string(), "IPv4", "repeated"))
        .map(|s| s[0].median)
        .unwrap_or(0.0);
    let empty = table
        .get(&("floor: empty XDP program".to_string(), "-", "repeated"))
        .map(|s| s[0].median)
        .unwrap_or(0.0);
    md += &format!(
        "\nConntrack hit (IPv4, repeated) costs {:.0} ns over the empty program's floor.\n\
         Goals: ratio of the largest to the smallest scale ≤ 1.3 for repeated packets and ≤ 2.5\n\
         for random members; conntrack hit ≤ floor + 60 ns.\n",
        hit - empty
    );
    let _ = floors;
    publish("datapath", &md, json!({ "rows": results }));
}

// ---------------------------------------------------------------- agent
