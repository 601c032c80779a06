//! `cargo xtask bench`: benchmarks, not tests. Every figure is measured in this run, side by
//! side with its baseline, and written to docs/benchmarks.md (one section per benchmark)
//! and target/bench/results.json (median, min, max and ratio of each figure).
//!
//! sg-bench <compile|datapath|agent|all> [--quick|--smoke]

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use serde_json::{json, Value};
use sg_agent::{
    compile::{
        compile, diff, membership_change, ChangedAddress, LocalInterface, Options, PlanIndex,
    },
    datapath::MapSizes,
    model::NetworkInterface,
    source::parse_str,
    testgen::Rng,
};
use sg_common::{PROG_BENCH_EMPTY, PROG_BENCH_HASH};
use sg_tests::{
    bpf::{Bpf, Hook, LO},
    packet::{tcp, TH_ACK, TH_RST, TH_SYN},
    privileges::require_root,
    scale,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Full,
    Quick,
    Smoke,
}

/// Summary of repeated measurements.
#[derive(Clone, Copy, Debug)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stat {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

fn stat_json(s: Stat, unit: &str) -> Value {
    json!({ "median": s.median, "min": s.min, "max": s.max, "unit": unit })
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Replaces (or appends) the section `name` of docs/benchmarks.md, and the key `name` of
/// target/bench/results.json.
static SMOKE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn publish(name: &str, markdown: &str, results: Value) {
    // A smoke run only proves the harness works: its figures never replace real ones.
    let smoke = SMOKE.load(std::sync::atomic::Ordering::Relaxed);
    let md_path = if smoke {
        root().join("target/bench/benchmarks-smoke.md")
    } else {
        root().join("docs/benchmarks.md")
    };
    std::fs::create_dir_all(md_path.parent().unwrap()).unwrap();
    let mut md = std::fs::read_to_string(&md_path).unwrap_or_else(|_| {
        "# Benchmarks\n\nMeasured with `cargo xtask bench` on the project's development VM (2 cores, shared \
         and noisy: compare figures of one run with each other, not across runs). Each section \
         is rewritten by the benchmark that owns it.\n"
            .to_string()
    });
    let (open, close) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    let block = format!("{open}\n{markdown}\n{close}");
    md = match (md.find(&open), md.find(&close)) {
        (Some(a), Some(b)) => format!("{}{}{}", &md[..a], block, &md[b + close.len()..]),
        _ => format!("{md}\n{block}\n"),
    };
    std::fs::write(&md_path, md).expect("writing docs/benchmarks.md");
    let json_path = root().join(if smoke {
        "target/bench/results-smoke.json"
    } else {
        "target/bench/results.json"
    });
    std::fs::create_dir_all(json_path.parent().unwrap()).unwrap();
    let mut all: Value = std::fs::read_to_string(&json_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(json!({}));
    all[name] = results;
    std::fs::write(&json_path, serde_json::to_string_pretty(&all).unwrap()).unwrap();
    println!("{markdown}");
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = if args.iter().any(|a| a == "--smoke") {
        Mode::Smoke
    } else if args.iter().any(|a| a == "--quick") {
        Mode::Quick
    } else {
        Mode::Full
    };
    SMOKE.store(mode == Mode::Smoke, std::sync::atomic::Ordering::Relaxed);
    let what = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(String::as_str)
        .unwrap_or("all");
    let started = Instant::now();
    let run = |name: &str| what == "all" || what == name;
    if run("compile") {
        bench_compile(mode);
    }
    if run("datapath") {
        if !require_root("bench datapath") {
            return ExitCode::FAILURE;
        }
        bench_datapath(mode);
    }
    if run("agent") {
        if !require_root("bench agent") {
            return ExitCode::FAILURE;
        }
        bench_agent(mode);
    }
    if run("peers") {
        if !require_root("bench peers") {
            return ExitCode::FAILURE;
        }
        sg_tests::peers::bench_peers(
            mode == Mode::Smoke,
            mode == Mode::Quick,
            &mut |name, md, v| publish(name, md, v),
        );
    }
    if !["all", "compile", "datapath", "agent", "peers"].contains(&what) {
        eprintln!("sg-bench: unknown benchmark {what:?} (all, compile, datapath, agent, peers)");
        return ExitCode::from(64);
    }
    eprintln!("sg-bench: done in {:.0?}", started.elapsed());
    ExitCode::SUCCESS
}

fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed().as_secs_f64() * 1000.0)
}

// ---------------------------------------------------------------- compile

fn bench_compile(mode: Mode) {
    let reps = if mode == Mode::Smoke { 1 } else { 3 };
    let scales: &[(u32, u32)] = match mode {
        Mode::Smoke => &[(10, 10), (1000, 1000)],
        _ => &[(10, 10), (1000, 1000), (10_000, 10_000), (100, 100_000)],
    };
    let locals = [LocalInterface {
        ifindex: 2,
        eni: "eni-srv".into(),
    }];
    let mut rows = String::new();
    let mut results = vec![];
    for &(rules, members) in scales {
        let text = scale::state_text(rules, members);
        let (state, parse_ms) = time(|| parse_str(&text).expect("bench state"));
        let mut times = vec![];
        let mut plan = None;
        for _ in 0..reps {
            let (p, ms) = time(|| compile(&state, &locals, &Options::default(), None));
            times.push(ms);
            plan = Some(p);
        }
        let plan = plan.unwrap();
        let s = stat(times);
        let ports: usize = plan.rulesets.values().map(|r| r.ports.len()).sum();
        rows += &format!(
            "| {rules} | {members} | {:.1} | {:.1} ({:.1}–{:.1}) | {} | {} | {ports} |\n",
            parse_ms,
            s.median,
            s.min,
            s.max,
            plan.prefixes.len(),
            plan.rulesets.len()
        );
        results.push(json!({ "rules": rules, "members": members, "parse_ms": parse_ms, "compile_ms": stat_json(s, "ms"),
            "prefixes": plan.prefixes.len(), "rulesets": plan.rulesets.len(), "port_entries": ports }));
    }
    // One member joins a 10k-member group.
    let members = if mode == Mode::Smoke { 1000 } else { 10_000 };
    let state = parse_str(&scale::state_text(100, members)).unwrap();
    let old = compile(&state, &locals, &Options::default(), None);
    let mut joined = state.clone();
    joined.network_interfaces.push(NetworkInterface {
        id: "eni-new".into(),
        mac: None,
        ipv4: vec![scale::member_v4(members + 1)],
        ipv6: vec![scale::member_v6(members + 1)],
        groups: vec!["sg-members".into()],
        timeouts: Default::default(),
    });
    let (mut ctimes, mut dtimes, mut ops) = (vec![], vec![], 0);
    for _ in 0..reps.max(3) {
        let (new, c) = time(|| compile(&joined, &locals, &Options::default(), Some(&old)));
        let (d, dt) = time(|| diff(&old, &new));
        ctimes.push(c);
        dtimes.push(dt);
        ops = d.len();
    }
    // The agent's path for the same change: only the new member's addresses.
    let mut mtimes = vec![];
    let mut incremental_ops = 0;
    for _ in 0..reps.max(3) {
        let mut plan = old.clone();
        let mut index = PlanIndex::new(&plan);
        let new = joined.network_interfaces.last().unwrap();
        let changed: Vec<ChangedAddress> = new
            .addresses()
            .map(|addr| ChangedAddress {
                addr,
                groups: Some(new.groups.iter().map(String::as_str).collect()),
            })
            .collect();
        let (change, t) =
            time(|| membership_change(&joined, &mut plan, &mut index, &changed).unwrap());
        mtimes.push(t);
        incremental_ops = change.ops.len();
    }
    let m = stat(mtimes);
    let (c, d) = (stat(ctimes), stat(dtimes));
    let md = format!(
        "## Compiler (`cargo xtask bench compile`)\n\n\
         Pure user-space work, before any map is touched: parse + validate, compile (flatten\n\
         prefixes, share rulesets, split port ranges), plan size. Median of {reps} (min–max).\n\n\
         | rules | members | parse ms | compile ms | address entries | rulesets | port entries |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n{rows}\n\
         One member joins a {members}-member group: recompile {:.1} ms ({:.1}–{:.1}), diff {:.2} ms \
         ({:.2}–{:.2}), **{ops} map operations** (its IPv4 and IPv6 address; nothing else changes).\n\
         The agent's path for it (`membership_change`: only the member's addresses): {:.3} ms \
         ({:.3}–{:.3}), {incremental_ops} map operations.\n",
        c.median, c.min, c.max, d.median, d.min, d.max, m.median, m.min, m.max
    );
    publish(
        "compile",
        &md,
        json!({ "scales": results, "one_member_change": { "members": members,
        "compile_ms": stat_json(c, "ms"), "diff_ms": stat_json(d, "ms"), "ops": ops,
        "membership_change_ms": stat_json(m, "ms"), "membership_change_ops": incremental_ops } }),
    );
}

// ---------------------------------------------------------------- datapath

struct Dp {
    bpf: Bpf,
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
        let r = self
            .bpf
            .dp
            .xdp(name)
            .expect("bench program")
            .test_run(opts)
            .expect("test run");
        r.duration.as_nanos() as f64
    }
}

fn member(i: u32, v6: bool) -> String {
    if v6 {
        scale::member_v6(i).to_string()
    } else {
        scale::member_v4(i).to_string()
    }
}

fn bench_datapath(mode: Mode) {
    let (scales, repeat, calls, reps): (&[u32], u32, u32, usize) = match mode {
        Mode::Smoke => (&[10, 1000], 2000, 200, 1),
        Mode::Quick => (&[10, 1000, 10_000, 100_000], 50_000, 1000, 3),
        Mode::Full => (&[10, 1000, 10_000, 100_000], 500_000, 5000, 5),
    };
    let me4 = "198.18.255.254";
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
                    dp.bpf
                        .dp
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

fn bench_agent(mode: Mode) {
    sg_tests::benches::bench_agent(
        mode == Mode::Smoke,
        mode == Mode::Quick,
        &mut |name, md, v| publish(name, md, v),
    );
}

#[allow(dead_code)]
fn unused(_: &Path, _: IpAddr, _: Duration) {}
