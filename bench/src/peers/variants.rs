//! The filters compared: no filter, sg (XDP and TC ingress), nftables (linear rules and
//! sets) and iptables, each installed from one security-group state of N rules.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    None,
    SgXdp,
    /// sg on XDP with flow logs on (the agent reads the event ring and writes records).
    SgXdpLogs,
    SgTc,
    NftLinear,
    NftSet,
    Iptables,
    /// A bare `XDP_DROP` program: the physical limit of dropping on this path.
    BareDrop,
}

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Variant::None => "(a) no filter",
            Variant::SgXdp => "(b) sg, XDP ingress",
            Variant::SgXdpLogs => "(b″) sg, XDP ingress, flow logs on",
            Variant::SgTc => "(b′) sg, TC ingress",
            Variant::NftLinear => "(c) nftables, linear + ct",
            Variant::NftSet => "(d) nftables, set ip.port + ct",
            Variant::Iptables => "(e) iptables (legacy), linear + ct",
            Variant::BareDrop => "(f) bare XDP_DROP (the physical limit)",
        }
    }

    pub(crate) fn scales(self, max: u32) -> bool {
        // 100k rules only for sg and nft sets (linear chains of 100k are not a real option).
        max < 100_000
            || matches!(
                self,
                Variant::None
                    | Variant::SgXdp
                    | Variant::SgXdpLogs
                    | Variant::SgTc
                    | Variant::NftSet
                    | Variant::BareDrop
            )
    }
}

/// The non-matching rules' peers and ports, then the client's rule last.
pub(crate) fn linear_rules(n: u32) -> Vec<(String, u16)> {
    (1..n)
        .map(|i| {
            (
                scale::rule_peer(i).trim_end_matches("/32").to_string(),
                10_000 + (i % 50_000) as u16,
            )
        })
        .collect()
}

pub(crate) fn sg_state(n: u32) -> String {
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

pub(crate) fn nft_script(n: u32, set: bool) -> String {
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

pub(crate) fn iptables_script(n: u32) -> String {
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

/// A variant installed on the server; removed on drop.
pub(crate) struct Installed {
    pub(crate) agent: Option<(Child, TempDir, PathBuf)>,
    pub(crate) server: String,
    pub(crate) variant: Variant,
    /// (f): the benchmark object holding the attached bare drop program (its link lives
    /// as long as the object).
    pub(crate) _bare: Option<crate::object::BenchObject>,
    pub setup_ms: f64,
    /// For sg: the agent's own time to parse, compile and program the maps (its log).
    pub program_ms: Option<f64>,
}

impl Installed {
    pub(crate) fn new(pair: &Pair, variant: Variant, n: u32) -> Installed {
        let started = Instant::now();
        let mut agent = None;
        let mut bare = None;
        match variant {
            Variant::None => {}
            Variant::BareDrop => {
                let mut obj = crate::object::BenchObject::load();
                // Attached from inside the server's namespace (the interface's name is
                // resolved there); the link lives as long as the object.
                pair.server.enter(|| {
                    obj.xdp(sg_common::PROG_BENCH_DROP)
                        .attach("eth0", aya::programs::xdp::XdpMode::Driver)
                        .expect("attaching the bare drop program");
                });
                bare = Some(obj);
            }
            Variant::SgXdp | Variant::SgXdpLogs | Variant::SgTc => {
                let dir = TempDir::new("peers");
                let pins = dir.path("pins");
                std::fs::create_dir_all(&pins).unwrap();
                run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&pins));
                let state = dir.path("state.toml");
                let sha = write_state(&state, &sg_state(n));
                let hook = if variant == Variant::SgTc {
                    "tc"
                } else {
                    "xdp"
                };
                let flow_log = dir.path("flow.log");
                let logs: Vec<&std::ffi::OsStr> = if variant == Variant::SgXdpLogs {
                    vec![
                        "--flow-log".as_ref(),
                        flow_log.as_os_str(),
                        "--flow-log-interval".as_ref(),
                        "1".as_ref(),
                    ]
                } else {
                    vec![]
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
                    .args(&logs)
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
            crate::agent::applied_ms(&std::fs::read_to_string(dir.path("agent.log")).ok()?)
        });
        Installed {
            agent,
            server: pair.server.name().to_string(),
            variant,
            _bare: bare,
            setup_ms,
            program_ms,
        }
    }

    /// Packets this variant's filter has dropped so far, from its own counter.
    pub(crate) fn dropped(&self) -> Option<u64> {
        match self.variant {
            Variant::None => None,
            // Every frame it sees, it drops.
            Variant::BareDrop => Some(prog_stats(sg_common::PROG_BENCH_DROP).1),
            Variant::SgXdp | Variant::SgXdpLogs | Variant::SgTc => {
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
    pub(crate) fn map_kib(&self) -> Option<f64> {
        let (_, _, pins) = self.agent.as_ref()?;
        let mut total = 0u64;
        for name in sg_common::registry::MAPS.iter().map(|m| m.name) {
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

    pub(crate) fn agent_rss_mib(&self) -> Option<f64> {
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
            Variant::SgXdp | Variant::SgXdpLogs | Variant::SgTc => {
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
            // The link goes with the object.
            Variant::None | Variant::BareDrop => {}
        }
    }
}
