//! `cargo xtask bench peers`: sg against the filters people would otherwise use, on the
//! same work in the same run, interleaved (A, B, A, B …). Two namespaces joined by a veth
//! pair; every variant filters the server's side with an equal policy generated from one
//! security-group state (N rules, the matching rule last).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use aya::programs::{TestRun, TestRunAttrs, TestRunOptions};

use sg_tests::{
    lab::{agent_bin, write_state, TempDir},
    netns::{run, veth, Netns},
    packet::{self, tcp, udp, TH_SYN},
    wait_for,
};

use crate::{agent::Publish, scale};

mod cpu;
mod load;
mod topology;
mod variants;

use cpu::*;
use load::*;
use topology::*;
use variants::*;

/// A flood's drop figures into the samples of variant `v`.
fn push_drops(
    samples: &mut std::collections::BTreeMap<(Variant, &str), Vec<f64>>,
    v: Variant,
    f: &Flood,
) {
    samples
        .entry((v, "flood_pps"))
        .or_default()
        .push(f.sent_pps);
    for (metric, value) in [
        ("dropped_pps", f.dropped_pps),
        ("drop_capacity", f.capacity_pps),
        ("program_ns", f.program_ns),
    ] {
        if let Some(x) = value {
            samples.entry((v, metric)).or_default().push(x);
        }
    }
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

pub fn bench_peers(smoke: bool, quick: bool, publish: &mut Publish) {
    let variants = [
        Variant::None,
        Variant::SgXdp,
        Variant::SgXdpLogs,
        Variant::SgTc,
        Variant::NftLinear,
        Variant::NftSet,
        Variant::Iptables,
        Variant::BareDrop,
    ];
    let (scales, reps, secs, mtus): (&[u32], usize, u32, &[u32]) = if smoke {
        (&[10], 1, 1, &[1500])
    } else if quick {
        (&[10, 10_000], 3, 1, &[1500, 9000])
    } else {
        (&[10, 1000, 10_000, 100_000], 3, 3, &[1500, 9000])
    };
    let flood_secs = if smoke || quick { 1.0 } else { 2.0 };
    let mut gen = Generator::new();
    // Per-program run time, for the flood's breakdown.
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    let mut rows: Vec<Value> = vec![];
    let mut memory: Vec<(u32, Variant, f64, f64)> = vec![];
    let mut setups: std::collections::BTreeMap<(u32, Variant), f64> = Default::default();
    let mut programs: std::collections::BTreeMap<u32, f64> = Default::default();
    let mut md = String::from(
        "## Against peers (`cargo xtask bench peers`)\n\n\
         Two namespaces joined by a veth pair; each variant filters the receiving side with an\n\
         equal policy from one security-group state: N TCP rules, the client's rule last, and\n\
         conntrack (established and related traffic accepted first). Variants run interleaved\n\
         (A, B, A, B …); medians with min–max, and the ratio to the unfiltered baseline of\n\
         the same run. The denied flood and the small packets come from sg's own generator\n\
         (BPF_PROG_RUN with live frames, random sources in 198.19.0.0/16, valid checksums),\n\
         transmitted by the client's veth to the server. For the flood's drop figures the\n\
         server's receive processing runs in its own kernel thread (threaded NAPI) on the last\n\
         CPU with real-time priority, as a NIC's softirq would, and the generator on the\n\
         others; everything else runs as veth does by default. The flood's drop rate is\n\
         bounded by what the generator and the veth ring deliver (frames the ring cannot take\n\
         are lost before any filter sees them), so each filter's *drop capacity* is also given:\n\
         packets it dropped per second of receive CPU time (the NAPI thread's run time), the\n\
         rate one core would drop at.\n\n",
    );
    for &mtu in mtus {
        let pair = Pair::new(mtu);
        for &n in scales {
            if mtu != 1500 && quick && n != scales[0] {
                continue; // --quick: jumbo frames at the smallest rule count only
            }
            // (f) drops everything: it has only drop figures, at MTU 1500.
            let active: Vec<Variant> = variants
                .iter()
                .copied()
                .filter(|v| v.scales(n) && (mtu == 1500 || *v != Variant::BareDrop))
                .collect();
            let mut samples: std::collections::BTreeMap<(Variant, &str), Vec<f64>> =
                Default::default();
            for _ in 0..reps {
                for &v in &active {
                    let installed = Installed::new(&pair, v, n);
                    setups.insert((n, v), installed.setup_ms);
                    if let Some(ms) = installed.program_ms {
                        programs.insert(n, ms);
                    }
                    if mtu == 1500 {
                        if let (Some(r), Some(k)) = (installed.agent_rss_mib(), installed.map_kib())
                        {
                            memory.retain(|(mn, mv, _, _)| !(*mn == n && *mv == v));
                            memory.push((n, v, r, k));
                        }
                    }
                    if v == Variant::BareDrop {
                        let f = flood(&pair, &installed, &mut gen, flood_secs);
                        push_drops(&mut samples, v, &f);
                        drop(installed);
                        continue;
                    }
                    samples
                        .entry((v, "tcp_1"))
                        .or_default()
                        .push(iperf(&pair, 1, secs));
                    samples
                        .entry((v, "tcp_2"))
                        .or_default()
                        .push(iperf(&pair, 2, secs));
                    if mtu == 1500 {
                        samples
                            .entry((v, "conn_s"))
                            .or_default()
                            .push(conn_rate(&pair, secs as f64 / 2.0));
                        let f = flood(&pair, &installed, &mut gen, flood_secs);
                        push_drops(&mut samples, v, &f);
                        samples
                            .entry((v, "tcp_under_flood"))
                            .or_default()
                            .push(f.stream_gbps);
                        samples
                            .entry((v, "udp64_pps"))
                            .or_default()
                            .push(udp_sink(&pair, &mut gen, flood_secs));
                    }
                    drop(installed);
                }
            }
            let base = |metric: &str| {
                samples
                    .get(&(Variant::None, metric))
                    .map(|v| median(v.clone()).0)
                    .unwrap_or(f64::NAN)
            };
            md += &format!("### MTU {mtu}, {n} rules\n\n");
            let tables: &[(&str, &[&str])] = if mtu == 1500 {
                &[
                    ("| variant | TCP 1 stream Gbit/s | × base | TCP 2 streams Gbit/s | × base | new conn/s | × base |", &["tcp_1", "tcp_2", "conn_s"]),
                    ("| variant | denied flood, frames/s through generator and filter | × base | dropped by the filter, pkt/s | drop capacity, pkt per second of receive CPU | × nft sets | in sg's program, ns/pkt | allowed TCP stream during the flood, Gbit/s | kept (× its own unflooded stream) | UDP 64 B into a sink, pkt/s | × base |", &["flood_pps", "dropped_pps", "drop_capacity", "program_ns", "tcp_under_flood", "kept", "udp64_pps"]),
                ]
            } else {
                &[(
                    "| variant | TCP 1 stream Gbit/s | × base | TCP 2 streams Gbit/s | × base |",
                    &["tcp_1", "tcp_2"],
                )]
            };
            for (header, metrics) in tables {
                let cols = header.matches('|').count() - 1;
                md += header;
                md += "\n|";
                md += &" --- |".repeat(cols);
                md += "\n";
                for &v in &active {
                    let mut line = format!("| {} |", v.label());
                    let mut row = json!({ "mtu": mtu, "rules": n, "variant": v.label(), "setup_ms": setups.get(&(n, v)) });
                    for m in *metrics {
                        if *m == "kept" {
                            let (Some(under), Some(alone)) = (
                                samples.get(&(v, "tcp_under_flood")),
                                samples.get(&(v, "tcp_1")),
                            ) else {
                                line += " – |";
                                continue;
                            };
                            let kept = median(under.clone()).0 / median(alone.clone()).0;
                            line += &format!(" {:.0} % |", kept * 100.0);
                            row["kept"] = json!(kept);
                            continue;
                        }
                        let Some(vals) = samples.get(&(v, *m)) else {
                            line += " – |";
                            continue;
                        };
                        let (med, lo, hi) = median(vals.clone());
                        // Drop capacity is compared with nftables' sets (no baseline drops).
                        let ratio = if *m == "drop_capacity" {
                            med / samples
                                .get(&(Variant::NftSet, *m))
                                .map_or(f64::NAN, |v| median(v.clone()).0)
                        } else {
                            med / base(m)
                        };
                        if matches!(*m, "dropped_pps" | "tcp_under_flood" | "program_ns") {
                            line += &format!(" {} ({}–{}) |", fmt(m, med), fmt(m, lo), fmt(m, hi));
                        } else {
                            line += &format!(
                                " {} ({}–{}) | {ratio:.2} |",
                                fmt(m, med),
                                fmt(m, lo),
                                fmt(m, hi)
                            );
                        }
                        row[*m] = json!({ "median": med, "min": lo, "max": hi, "ratio_to_baseline": ratio });
                    }
                    md += &line;
                    md += "\n";
                    rows.push(row);
                }
                md += "\n";
            }
            // The cost of flow logs (SPEC §7), side by side in this run.
            let med = |v: Variant, m: &str| samples.get(&(v, m)).map(|s| median(s.clone()).0);
            if let (Some(on), Some(off)) = (
                med(Variant::SgXdpLogs, "tcp_1"),
                med(Variant::SgXdp, "tcp_1"),
            ) {
                let capacity = match (
                    med(Variant::SgXdpLogs, "drop_capacity"),
                    med(Variant::SgXdp, "drop_capacity"),
                ) {
                    (Some(a), Some(b)) => {
                        format!(
                            ", and the denied flood {:.0} % of its drop capacity",
                            a / b * 100.0
                        )
                    }
                    _ => String::new(),
                };
                md += &format!(
                    "Flow logs on (b″) against off (b), XDP, {n} rules: the allowed TCP stream keeps {:.0} % of its throughput{capacity}.\n\n",
                    on / off * 100.0
                );
                rows.push(json!({ "mtu": mtu, "rules": n, "flow_log_cost": { "tcp_1_kept": on / off, "drop_capacity_kept": med(Variant::SgXdpLogs, "drop_capacity").zip(med(Variant::SgXdp, "drop_capacity")).map(|(a, b)| a / b) } }));
            }
            // The physical limit (f): each drop capacity against a bare XDP_DROP's.
            if let Some(limit) = med(Variant::BareDrop, "drop_capacity") {
                let of = |v: Variant| {
                    med(v, "drop_capacity")
                        .map_or("–".to_string(), |c| format!("{:.2}×", c / limit))
                };
                md += &format!(
                    "Drop capacity against the physical limit (f, a bare XDP_DROP: {}), {n} rules: sg XDP {}, sg TC {}, nftables sets {}, nftables linear {}.\n\n",
                    fmt("drop_capacity", limit),
                    of(Variant::SgXdp),
                    of(Variant::SgTc),
                    of(Variant::NftSet),
                    of(Variant::NftLinear),
                );
                rows.push(json!({ "mtu": mtu, "rules": n, "of_physical_limit": {
                    "sg_xdp": med(Variant::SgXdp, "drop_capacity").map(|c| c / limit),
                    "sg_tc": med(Variant::SgTc, "drop_capacity").map(|c| c / limit),
                    "nft_set": med(Variant::NftSet, "drop_capacity").map(|c| c / limit),
                } }));
            }
        }
    }
    // Control plane: one change, and a full rebuild, at 10k rules.
    let n = if smoke { 100 } else { 10_000 };
    let changes = if smoke {
        5
    } else if quick {
        20
    } else {
        50
    };
    let sg = crate::agent::one_member_latency("json", n, changes).end_to_end;
    let pair = Pair::new(1500);
    let timed = |ns: &Netns, cmd: &str, args: Vec<String>| -> f64 {
        let t = Instant::now();
        let out = ns
            .cmd(cmd)
            .args(&args)
            .output()
            .expect("control-plane command");
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t.elapsed().as_secs_f64() * 1000.0
    };
    let nft = {
        let _i = Installed::new(&pair, Variant::NftSet, n);
        let mut v: Vec<f64> = (0..changes)
            .map(|k| {
                timed(
                    &pair.server,
                    "nft",
                    vec![
                        "add".into(),
                        "element".into(),
                        "inet".into(),
                        "sgbench".into(),
                        "allowed".into(),
                        format!("{{ 198.18.3.{} . 3306 }}", k % 250 + 1),
                    ],
                )
            })
            .collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    };
    // iptables users apply a change atomically by restoring the whole ruleset with it.
    let ipt = {
        let _i = Installed::new(&pair, Variant::Iptables, n);
        let mut v: Vec<f64> = (0..changes)
            .map(|k| {
                let script = iptables_script(n).replace(
                    "-A INPUT -j DROP",
                    &format!("-A INPUT -s 198.18.3.{}/32 -p tcp --dport 3306 -j ACCEPT\n-A INPUT -j DROP", k % 250 + 1),
                );
                let t = Instant::now();
                let mut c = pair.server.cmd("iptables-legacy-restore");
                c.stdin(Stdio::piped());
                let mut child = c.spawn().expect("iptables-legacy-restore");
                child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
                assert!(child.wait().unwrap().success());
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    };
    let p = crate::agent::percentile_of;
    md += &format!(
        "### Control plane, {n} rules\n\n\
         | change | p50 ms | p99 ms |\n| --- | ---: | ---: |\n\
         | sg: one member joins a {n}-member group (state file → address in the map) | {:.1} | {:.1} |\n\
         | nft: `nft add element` (one set element, process included) | {:.1} | {:.1} |\n\
         | iptables (legacy): `iptables-restore` of the ruleset with the one more rule | {:.1} | {:.1} |\n\n\
         Full {n}-rule build, install to enforcing: sg {} ms from agent start (of which parse, compile and \
         program the maps: {} ms; the rest is loading and verifying the programs), nft linear {} ms, nft set \
         {} ms, iptables-legacy-restore {} ms.\n\n",
        p(&sg, 0.5), p(&sg, 0.99), p(&nft, 0.5), p(&nft, 0.99), p(&ipt, 0.5), p(&ipt, 0.99),
        setup_text(&setups, n, Variant::SgTc),
        programs.get(&n).map_or("–".to_string(), |ms| format!("{ms:.0}")),
        setup_text(&setups, n, Variant::NftLinear), setup_text(&setups, n, Variant::NftSet), setup_text(&setups, n, Variant::Iptables)
    );
    md += "### Memory of sg\n\n| rules | variant | agent RSS MiB | kernel map memory KiB |\n| ---: | --- | ---: | ---: |\n";
    for (n, v, rss, kib) in &memory {
        md += &format!("| {n} | {} | {rss:.1} | {kib:.0} |\n", v.label());
    }
    publish(
        "peers",
        &md,
        json!({ "rows": rows,
            "control_plane": { "rules": n, "sg_one_member_ms": { "p50": p(&sg, 0.5), "p99": p(&sg, 0.99) },
                "nft_add_element_ms": { "p50": p(&nft, 0.5), "p99": p(&nft, 0.99) },
                "iptables_restore_ms": { "p50": p(&ipt, 0.5), "p99": p(&ipt, 0.99) } },
            "memory": memory.iter().map(|(n, v, r, k)| json!({ "rules": n, "variant": v.label(), "agent_rss_mib": r, "map_kib": k })).collect::<Vec<_>>() }),
    );
}

fn setup_text(
    setups: &std::collections::BTreeMap<(u32, Variant), f64>,
    n: u32,
    v: Variant,
) -> String {
    setups
        .get(&(n, v))
        .map_or("–".to_string(), |ms| format!("{ms:.0}"))
}

fn fmt(metric: &str, v: f64) -> String {
    match metric {
        "conn_s" | "flood_pps" | "dropped_pps" | "udp64_pps" | "drop_capacity" => {
            format!("{v:.0}")
        }
        _ => format!("{v:.1}"),
    }
}
