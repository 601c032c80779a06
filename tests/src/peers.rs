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

use crate::{
    benches::Publish,
    lab::{agent_bin, write_state, TempDir},
    netns::{run, veth, Netns},
    scale, wait_for,
};

const SERVER: &str = "198.18.0.1";
const CLIENT: &str = "198.18.0.2";
const SERVER_MAC: &str = "02:5e:00:00:fe:01";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    None,
    SgXdp,
    SgTc,
    NftLinear,
    NftSet,
    Iptables,
}

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Variant::None => "(a) no filter",
            Variant::SgXdp => "(b) sg, XDP ingress",
            Variant::SgTc => "(b′) sg, TC ingress",
            Variant::NftLinear => "(c) nftables, linear + ct",
            Variant::NftSet => "(d) nftables, set ip.port + ct",
            Variant::Iptables => "(e) iptables (legacy), linear + ct",
        }
    }

    fn scales(self, max: u32) -> bool {
        // 100k rules only for sg and nft sets (linear chains of 100k are not a real option).
        max < 100_000
            || matches!(
                self,
                Variant::None | Variant::SgXdp | Variant::SgTc | Variant::NftSet
            )
    }
}

/// The non-matching rules' peers and ports, then the client's rule last.
fn linear_rules(n: u32) -> Vec<(String, u16)> {
    (1..n)
        .map(|i| {
            (
                scale::rule_peer(i).trim_end_matches("/32").to_string(),
                10_000 + (i % 50_000) as u16,
            )
        })
        .collect()
}

fn sg_state(n: u32) -> String {
    let mut s = String::from("[[security_group]]\nid = \"sg-server\"\ningress = [\n");
    for (peer, port) in linear_rules(n) {
        if peer.contains(':') {
            s += &format!(
                "  {{ protocol = \"tcp\", ports = \"{port}\", from = [\"{peer}/128\"] }},\n"
            );
        } else {
            s += &format!(
                "  {{ protocol = \"tcp\", ports = \"{port}\", from = [\"{peer}/32\"] }},\n"
            );
        }
    }
    s += &format!("  {{ protocol = \"tcp\", ports = \"5201-5300\", from = [\"{CLIENT}/32\"] }},\n");
    s += &format!("  {{ protocol = \"udp\", ports = \"9000\", from = [\"{CLIENT}/32\"] }},\n]\n");
    s += &format!("[[interface]]\nid = \"eni-server\"\nmac = \"{SERVER_MAC}\"\nipv4 = [\"{SERVER}\"]\ngroups = [\"sg-server\"]\n");
    s
}

fn nft_script(n: u32, set: bool) -> String {
    let mut s = String::from("table inet sgbench {\n");
    if set {
        s += "  set allowed {\n    type ipv4_addr . inet_service\n    elements = {\n";
        for (peer, port) in linear_rules(n)
            .into_iter()
            .filter(|(p, _)| !p.contains(':'))
        {
            s += &format!("      {peer} . {port},\n");
        }
        s += &format!("      {CLIENT} . 5201, {CLIENT} . 5300\n    }}\n  }}\n");
    }
    s += "  chain input {\n    type filter hook input priority 0; policy drop;\n";
    s += "    ct state established,related accept\n    iifname \"lo\" accept\n    meta l4proto icmp accept\n";
    if set {
        s += "    ip saddr . tcp dport @allowed accept\n";
    } else {
        for (peer, port) in linear_rules(n) {
            let fam = if peer.contains(':') { "ip6" } else { "ip" };
            s += &format!("    {fam} saddr {peer} tcp dport {port} accept\n");
        }
        s += &format!("    ip saddr {CLIENT} tcp dport 5201-5300 accept\n");
    }
    s += &format!("    ip saddr {CLIENT} udp dport 9000 accept\n  }}\n}}\n");
    s
}

fn iptables_script(n: u32) -> String {
    let mut s =
        String::from("*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    s += "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n-A INPUT -i lo -j ACCEPT\n-A INPUT -p icmp -j ACCEPT\n";
    for (peer, port) in linear_rules(n)
        .into_iter()
        .filter(|(p, _)| !p.contains(':'))
    {
        s += &format!("-A INPUT -s {peer}/32 -p tcp --dport {port} -j ACCEPT\n");
    }
    s += &format!("-A INPUT -s {CLIENT}/32 -p tcp --dport 5201:5300 -j ACCEPT\n-A INPUT -s {CLIENT}/32 -p udp --dport 9000 -j ACCEPT\nCOMMIT\n");
    s
}

/// Server and client namespaces joined by a veth pair.
struct Pair {
    server: Netns,
    client: Netns,
    iperf: Child,
    stop: Arc<AtomicBool>,
}

impl Pair {
    fn new(mtu: u32) -> Pair {
        let server = Netns::new("psrv");
        let client = Netns::new("pcli");
        veth(
            &server,
            "eth0",
            &[&format!("{SERVER}/24")],
            &client,
            "eth0",
            &[&format!("{CLIENT}/24")],
        );
        server.ip(&["link", "set", "eth0", "address", SERVER_MAC]);
        for ns in [&server, &client] {
            ns.ip(&["link", "set", "eth0", "mtu", &mtu.to_string()]);
        }
        let iperf = server
            .cmd("iperf3")
            .args(["-s", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 -s");
        // The connection-rate sink: accept and close.
        let listener: TcpListener = server.tcp_listen(format!("{SERVER}:5300").parse().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                if s2.load(Ordering::Relaxed) {
                    return;
                }
                drop(c);
            }
        });
        wait_for("iperf3 server", Duration::from_secs(5), || {
            client
                .tcp_connect(
                    format!("{SERVER}:5201").parse().unwrap(),
                    Duration::from_millis(200),
                )
                .ok()
                .map(|_| ())
        });
        Pair {
            server,
            client,
            iperf,
            stop,
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.iperf.kill();
        let _ = self.iperf.wait();
    }
}

/// A variant installed on the server; removed on drop.
struct Installed {
    agent: Option<(Child, TempDir, PathBuf)>,
    server: String,
    variant: Variant,
    pub setup_ms: f64,
}

impl Installed {
    fn new(pair: &Pair, variant: Variant, n: u32) -> Installed {
        let started = Instant::now();
        let mut agent = None;
        match variant {
            Variant::None => {}
            Variant::SgXdp | Variant::SgTc => {
                let dir = TempDir::new("peers");
                let pins = dir.path("pins");
                std::fs::create_dir_all(&pins).unwrap();
                run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&pins));
                let state = dir.path("state.toml");
                let sha = write_state(&state, &sg_state(n));
                let hook = if variant == Variant::SgXdp {
                    "xdp"
                } else {
                    "tc"
                };
                let child = pair
                    .server
                    .cmd(agent_bin().to_str().unwrap())
                    .args(["run", "--state"])
                    .arg(&state)
                    .arg("--pin-dir")
                    .arg(pins.join("sg"))
                    .arg("--run-dir")
                    .arg(dir.path("run"))
                    .args(["--ingress-hook", hook])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.path("agent.log")).unwrap())
                    .spawn()
                    .expect("sg-agent");
                let pin_dir = pins.join("sg");
                wait_for("sg-agent to enforce", Duration::from_secs(120), || {
                    let out = Command::new(agent_bin())
                        .args(["status", "--json", "--pin-dir"])
                        .arg(&pin_dir)
                        .output()
                        .ok()?;
                    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
                    (v["applied_state_sha256"].as_str() == Some(sha.as_str())).then_some(())
                });
                agent = Some((child, dir, pins));
            }
            Variant::NftLinear | Variant::NftSet => {
                let mut c = pair.server.cmd("nft");
                c.args(["-f", "-"]).stdin(Stdio::piped());
                let mut child = c.spawn().expect("nft");
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(nft_script(n, variant == Variant::NftSet).as_bytes())
                    .unwrap();
                assert!(child.wait().unwrap().success(), "nft -f failed");
            }
            Variant::Iptables => {
                let mut c = pair.server.cmd("iptables-legacy-restore");
                c.stdin(Stdio::piped());
                let mut child = c.spawn().expect("iptables-legacy-restore");
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(iptables_script(n).as_bytes())
                    .unwrap();
                assert!(
                    child.wait().unwrap().success(),
                    "iptables-legacy-restore failed"
                );
            }
        }
        let setup_ms = started.elapsed().as_secs_f64() * 1000.0;
        Installed {
            agent,
            server: pair.server.name().to_string(),
            variant,
            setup_ms,
        }
    }

    fn agent_rss_mib(&self) -> Option<f64> {
        let (child, _, _) = self.agent.as_ref()?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok()?;
        let kib: f64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        match self.variant {
            Variant::SgXdp | Variant::SgTc => {
                if let Some((mut child, dir, pins)) = self.agent.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = Command::new(agent_bin())
                        .args(["detach", "--pin-dir"])
                        .arg(pins.join("sg"))
                        .output();
                    let _ = Command::new("umount").arg(&pins).status();
                    drop(dir);
                }
            }
            Variant::NftLinear | Variant::NftSet => {
                let _ = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &self.server,
                        "nft",
                        "delete",
                        "table",
                        "inet",
                        "sgbench",
                    ])
                    .output();
            }
            Variant::Iptables => {
                let _ = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &self.server,
                        "sh",
                        "-c",
                        "iptables-legacy -P INPUT ACCEPT; iptables-legacy -F",
                    ])
                    .output();
            }
            Variant::None => {}
        }
    }
}

fn iperf(pair: &Pair, streams: u32, secs: u32) -> f64 {
    let out = pair
        .client
        .cmd("iperf3")
        .args([
            "-c",
            SERVER,
            "-p",
            "5201",
            "-J",
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
        ])
        .output()
        .expect("iperf3 -c");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// New connections per second: connect, close, repeat, for `secs` (bounded in time).
fn conn_rate(pair: &Pair, secs: f64) -> f64 {
    let addr: SocketAddr = format!("{SERVER}:5300").parse().unwrap();
    pair.client.enter(|| {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            if let Ok(mut s) =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            {
                let mut b = [0u8; 1];
                let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
                let _ = s.read(&mut b);
                n += 1;
            }
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

pub fn bench_peers(smoke: bool, quick: bool, publish: &mut Publish) {
    let variants = [
        Variant::None,
        Variant::SgXdp,
        Variant::SgTc,
        Variant::NftLinear,
        Variant::NftSet,
        Variant::Iptables,
    ];
    let (scales, reps, secs, mtus): (&[u32], usize, u32, &[u32]) = if smoke {
        (&[10], 1, 1, &[1500])
    } else if quick {
        (&[10, 10_000], 3, 2, &[1500, 9000])
    } else {
        (&[10, 1000, 10_000, 100_000], 3, 3, &[1500, 9000])
    };
    let mut rows: Vec<Value> = vec![];
    let mut md = String::from(
        "## Against peers (`cargo xtask bench peers`)\n\n\
         Two namespaces joined by a veth pair; each variant filters the receiving side with an\n\
         equal policy from one security-group state: N TCP rules, the client's rule last, and\n\
         conntrack (established and related traffic accepted first). Variants run interleaved\n\
         (A, B, A, B …); medians with min–max, and the ratio to the unfiltered baseline of\n\
         the same run.\n\n",
    );
    for &mtu in mtus {
        let pair = Pair::new(mtu);
        for &n in scales {
            let active: Vec<Variant> = variants.iter().copied().filter(|v| v.scales(n)).collect();
            let mut samples: std::collections::BTreeMap<(Variant, &str), Vec<f64>> =
                Default::default();
            let mut setup: std::collections::BTreeMap<Variant, f64> = Default::default();
            let mut rss: std::collections::BTreeMap<Variant, f64> = Default::default();
            for _ in 0..reps {
                for &v in &active {
                    let installed = Installed::new(&pair, v, n);
                    setup.insert(v, installed.setup_ms);
                    if let Some(r) = installed.agent_rss_mib() {
                        rss.insert(v, r);
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
            md += &format!(
                "### MTU {mtu}, {n} rules\n\n| variant | TCP 1 stream Gbit/s | × base | TCP 2 streams Gbit/s | × base |{}\n| --- | ---: | ---: | ---: | ---: |{}\n",
                if mtu == 1500 { " new conn/s | × base |" } else { "" },
                if mtu == 1500 { " ---: | ---: |" } else { "" }
            );
            for &v in &active {
                let mut line = format!("| {} |", v.label());
                let mut row = json!({ "mtu": mtu, "rules": n, "variant": v.label(), "setup_ms": setup.get(&v), "agent_rss_mib": rss.get(&v) });
                let metrics: &[&str] = if mtu == 1500 {
                    &["tcp_1", "tcp_2", "conn_s"]
                } else {
                    &["tcp_1", "tcp_2"]
                };
                for m in metrics {
                    let (med, lo, hi) = median(samples[&(v, *m)].clone());
                    let ratio = med / base(m);
                    line += &format!(
                        " {} ({}–{}) | {ratio:.2} |",
                        fmt(*m, med),
                        fmt(*m, lo),
                        fmt(*m, hi)
                    );
                    row[*m] =
                        json!({ "median": med, "min": lo, "max": hi, "ratio_to_baseline": ratio });
                }
                md += &line;
                md += "\n";
                rows.push(row);
            }
            md += "\n";
        }
    }
    md += "Setup time (policy installed and enforcing) and agent RSS per variant are in\n\
           `target/bench/results.json`.\n";
    publish("peers", &md, json!({ "rows": rows }));
}

fn fmt(metric: &str, v: f64) -> String {
    if metric == "conn_s" {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}
