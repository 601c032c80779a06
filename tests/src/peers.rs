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
use sg_agent::datapath::{Datapath, MapSizes};

use crate::{
    benches::Publish,
    lab::{agent_bin, write_state, TempDir},
    netns::{run, veth, Netns},
    packet::{self, tcp, udp, TH_SYN},
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
    s += &format!("    ip saddr {CLIENT} udp dport 9000 accept\n    counter name dropped drop\n  }}\n  counter dropped {{}}\n}}\n");
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
    s += &format!("-A INPUT -s {CLIENT}/32 -p tcp --dport 5201:5300 -j ACCEPT\n-A INPUT -s {CLIENT}/32 -p udp --dport 9000 -j ACCEPT\n-A INPUT -j DROP\nCOMMIT\n");
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
            // NAPI on both ends: the generator's frames (XDP_TX) need it on the receiver.
            let _ = ns.cmd("ethtool").args(["-K", "eth0", "gro", "on"]).output();
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

impl Pair {
    /// Moves the server's receive processing into its own kernel thread on the last CPU
    /// with real-time priority (threaded NAPI), as a NIC's softirq on a core of its own,
    /// and returns the thread's pids; or (`on` false) back inline.
    fn threaded_receive(&self, on: bool) -> Vec<u32> {
        let before = napi_threads();
        let _ = self
            .server
            .cmd("sh")
            .args([
                "-c",
                &format!("echo {} > /sys/class/net/eth0/threaded", on as u8),
            ])
            .output();
        if !on {
            return vec![];
        }
        let threads: Vec<u32> = napi_threads()
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        pin_to_receive_cpu(&threads);
        threads
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
    /// For sg: the agent's own time to parse, compile and program the maps (its log).
    pub program_ms: Option<f64>,
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
        let program_ms = agent.as_ref().and_then(|(_, dir, _)| {
            crate::benches::applied_ms(&std::fs::read_to_string(dir.path("agent.log")).ok()?)
        });
        Installed {
            agent,
            server: pair.server.name().to_string(),
            variant,
            setup_ms,
            program_ms,
        }
    }

    /// Packets this variant's filter has dropped so far, from its own counter.
    fn dropped(&self) -> Option<u64> {
        match self.variant {
            Variant::None => None,
            Variant::SgXdp | Variant::SgTc => {
                let (_, _, pins) = self.agent.as_ref()?;
                let out = Command::new(agent_bin())
                    .args(["status", "--json", "--pin-dir"])
                    .arg(pins.join("sg"))
                    .output()
                    .ok()?;
                let v: Value = serde_json::from_slice(&out.stdout).ok()?;
                v["interfaces"][0]["counters"]["ingress"]["dropped_policy"].as_u64()
            }
            Variant::NftLinear | Variant::NftSet => {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &self.server,
                        "nft",
                        "-j",
                        "list",
                        "counter",
                        "inet",
                        "sgbench",
                        "dropped",
                    ])
                    .output()
                    .ok()?;
                let v: Value = serde_json::from_slice(&out.stdout).ok()?;
                v["nftables"]
                    .as_array()?
                    .iter()
                    .find_map(|o| o["counter"]["packets"].as_u64())
            }
            Variant::Iptables => {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &self.server,
                        "iptables-legacy",
                        "-L",
                        "INPUT",
                        "-v",
                        "-x",
                        "-n",
                    ])
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                let line = text.lines().rev().find(|l| {
                    l.contains("DROP")
                        && l.contains("0.0.0.0/0            0.0.0.0/0")
                        && !l.starts_with("Chain")
                })?;
                line.split_whitespace().next()?.parse().ok()
            }
        }
    }

    /// Kernel memory of the agent's pinned maps (bpftool's bytes_memlock).
    fn map_kib(&self) -> Option<f64> {
        let (_, _, pins) = self.agent.as_ref()?;
        let mut total = 0u64;
        for name in sg_common::ALL_MAPS {
            let out = Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(pins.join("sg").join(name))
                .output()
                .ok()?;
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            total += v["bytes_memlock"].as_u64().unwrap_or(0);
        }
        Some(total as f64 / 1024.0)
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

/// An iperf3 client of the server, JSON output.
fn iperf_client(pair: &Pair, streams: u32, secs: u32) -> Command {
    let mut c = pair.client.cmd("iperf3");
    c.args([
        "-c",
        SERVER,
        "-p",
        "5201",
        "-J",
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
    ]);
    c
}

/// Received throughput from iperf3's JSON report, Gbit/s.
fn iperf_gbps(json: &[u8]) -> f64 {
    let v: Value = serde_json::from_slice(json).unwrap_or(Value::Null);
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

fn iperf(pair: &Pair, streams: u32, secs: u32) -> f64 {
    iperf_gbps(
        &iperf_client(pair, streams, secs)
            .output()
            .expect("iperf3 -c")
            .stdout,
    )
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

/// The last CPU, where receive processing runs; the generator runs on the others.
fn receive_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
}

/// Pids of the threaded-NAPI kernel threads of every `eth0`.
fn napi_threads() -> Vec<u32> {
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
fn cpu_ns(pids: &[u32]) -> u64 {
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
fn pin_to_receive_cpu(threads: &[u32]) {
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
fn avoid_receive_cpu() {
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

/// The traffic generator: sg_gen run with BPF_PROG_RUN in live-frames mode, as if the
/// frames arrived on the client's eth0, which transmits them (XDP_TX) to the server.
struct Generator {
    dp: Datapath,
}

impl Generator {
    fn new() -> Generator {
        let sizes = MapSizes {
            conntrack: 64,
            conntrack_new: 64,
            addresses: 64,
            networks: 64,
            ports: 64,
            interfaces: 4,
            rules: 64,
            fragments: 16,
        };
        Generator {
            dp: Datapath::load(&sizes).expect("loading the generator"),
        }
    }

    /// Sends `template` (re-randomised per frame) for `secs`; returns frames sent.
    fn send(&mut self, pair: &Pair, template: &[u8], secs: f64) -> u64 {
        let ifindex = pair.client.ifindex("eth0");
        let prog = self.dp.xdp(sg_common::PROG_GEN).expect("generator program");
        pair.client.enter(|| {
            avoid_receive_cpu();
            let mut ctx = [0u8; 24];
            ctx[4..8].copy_from_slice(&(template.len() as u32).to_ne_bytes());
            ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed().as_secs_f64() < secs {
                let opts = TestRunOptions {
                    data_in: Some(template),
                    ctx_in: Some(&ctx),
                    repeat: 20_000,
                    attrs: TestRunAttrs::new().xdp_live_frames(64),
                    ..TestRunOptions::default()
                };
                match prog.test_run(opts) {
                    Ok(_) => sent += 20_000,
                    Err(e) => panic!("live-frames generator: {e:?}"),
                }
            }
            sent
        })
    }
}

fn syn_flood_template() -> Vec<u8> {
    let mut f = tcp("198.19.0.1", SERVER, 1024, 7777, TH_SYN).build();
    f[0..6].copy_from_slice(&mac_bytes(SERVER_MAC));
    packet::fix_ipv4_checksums(&mut f);
    f
}

fn udp_template() -> Vec<u8> {
    let mut s = udp(CLIENT, SERVER, 1024, 9000);
    s.payload = 22; // a 64-byte frame
    let mut f = s.build();
    f[0..6].copy_from_slice(&mac_bytes(SERVER_MAC));
    packet::fix_ipv4_checksums(&mut f);
    f
}

fn mac_bytes(mac: &str) -> [u8; 6] {
    let mut b = [0u8; 6];
    for (i, part) in mac.split(':').enumerate() {
        b[i] = u8::from_str_radix(part, 16).unwrap();
    }
    b
}

/// Packets per second received by a UDP sink on the server during `secs`.
fn udp_sink(pair: &Pair, gen: &mut Generator, secs: f64) -> f64 {
    let sock = pair
        .server
        .udp_bind(format!("{SERVER}:9000").parse().unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let counter = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut n = 0u64;
        while !s2.load(Ordering::Relaxed) {
            if sock.recv(&mut buf).is_ok() {
                n += 1;
            }
        }
        n
    });
    let started = Instant::now();
    gen.send(pair, &udp_template(), secs);
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let n = counter.join().unwrap();
    n as f64 / started.elapsed().as_secs_f64()
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
            let active: Vec<Variant> = variants.iter().copied().filter(|v| v.scales(n)).collect();
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
                        samples
                            .entry((v, "flood_pps"))
                            .or_default()
                            .push(f.sent_pps);
                        if let Some(d) = f.dropped_pps {
                            samples.entry((v, "dropped_pps")).or_default().push(d);
                        }
                        if let Some(c) = f.capacity_pps {
                            samples.entry((v, "drop_capacity")).or_default().push(c);
                        }
                        if let Some(ns) = f.program_ns {
                            samples.entry((v, "program_ns")).or_default().push(ns);
                        }
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
                            let kept = median(samples[&(v, "tcp_under_flood")].clone()).0
                                / median(samples[&(v, "tcp_1")].clone()).0;
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
    let sg = crate::benches::one_member_latency("json", n, changes).end_to_end;
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
    let p = crate::benches::percentile_of;
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

/// Total run time (ns) and runs of the loaded programs named `name` (kernel BPF
/// statistics, switched on for the benchmark).
fn prog_stats(name: &str) -> (u64, u64) {
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

/// What a denied flood showed.
struct Flood {
    /// Frames per second the generator got through (into the server's veth ring).
    sent_pps: f64,
    /// Packets per second the filter dropped, by its own counter.
    dropped_pps: Option<f64>,
    /// Packets the filter drops per second of the server's receive CPU time: its drop
    /// capacity per core, whatever the generator and the veth ring could deliver.
    capacity_pps: Option<f64>,
    /// For sg: ns per packet spent in its ingress program during the flood.
    program_ns: Option<f64>,
    /// The allowed TCP stream's throughput during the flood, Gbit/s.
    stream_gbps: f64,
}

/// A denied SYN flood from random sources, alone, with the server's receive processing
/// on a core of its own: frames the generator got through, packets the filter dropped and
/// the receive CPU time it took; then (receive processing inline again, as in every other
/// figure) the throughput of an allowed TCP stream during the same flood. (On veth an XDP program turns every
/// large skb of the stream into a copied frame, so the stream and the flood are measured
/// apart: together, the copies would set the drop rate.)
fn flood(pair: &Pair, installed: &Installed, gen: &mut Generator, secs: f64) -> Flood {
    let program = match installed.variant {
        Variant::SgXdp => Some(sg_common::PROG_XDP_INGRESS),
        Variant::SgTc => Some(sg_common::PROG_TC_INGRESS),
        _ => None,
    };
    let napi = pair.threaded_receive(true);
    let stats_before = program.map(prog_stats);
    let before = installed.dropped();
    let cpu_before = cpu_ns(&napi);
    let t = Instant::now();
    let sent = gen.send(pair, &syn_flood_template(), secs);
    let elapsed = t.elapsed().as_secs_f64();
    let cpu = cpu_ns(&napi).saturating_sub(cpu_before) as f64 / 1e9;
    let program_ns = program.zip(stats_before).and_then(|(name, (t0, n0))| {
        let (t1, n1) = prog_stats(name);
        (n1 > n0).then(|| (t1 - t0) as f64 / (n1 - n0) as f64)
    });
    let after = installed.dropped();
    pair.threaded_receive(false);
    let dropped = match (before, after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64),
        _ => None,
    };
    let stream = iperf_client(pair, 1, secs.ceil() as u32 + 1)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 -c");
    std::thread::sleep(Duration::from_millis(300));
    gen.send(pair, &syn_flood_template(), secs);
    let out = stream.wait_with_output().expect("iperf3 -c");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let stream_gbps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9;
    Flood {
        sent_pps: sent as f64 / elapsed,
        dropped_pps: dropped.map(|d| d / elapsed),
        capacity_pps: dropped.filter(|_| cpu > 0.0).map(|d| d / cpu),
        program_ns,
        stream_gbps,
    }
}

fn fmt(metric: &str, v: f64) -> String {
    match metric {
        "conn_s" | "flood_pps" | "dropped_pps" | "udp64_pps" | "drop_capacity" => {
            format!("{v:.0}")
        }
        _ => format!("{v:.1}"),
    }
}
