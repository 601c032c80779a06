//! The command line of SPEC §5: run, validate, explain, status, flows, detach. Machine
//! output goes to stdout, logs and errors to stderr; bad usage exits 64.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use sg_common::{counter, ct, drop_reason, Counters, DIR_EGRESS, DIR_INGRESS};

use crate::{
    agent::{self, Agent, RunOptions},
    datapath::{self, addr_of, IngressHook, MapSizes},
    eval::{self, Packet, Verdict},
    model::{Direction, Protocol},
    source, system,
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sg";

/// Exit code for bad usage (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "sg-agent",
    version,
    about = "AWS-style security groups enforced in the Linux kernel with eBPF",
    long_about = "sg-agent enforces EC2 security groups on this host's interfaces: it compiles the \
                  state file into BPF maps, attaches an ingress (XDP or TC) and a TC egress program \
                  to every interface whose MAC address is in the state, and keeps the maps equal \
                  to the state as it changes. Programs and maps stay in place when it exits."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load, attach and enforce the state; watch it for changes until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Check a state file: exit 0 when valid, else print every error and exit 1.
    Validate {
        /// State file (native TOML or AWS JSON).
        #[arg(long)]
        state: PathBuf,
    },
    /// Say whether the state allows a packet, and which rule allows it.
    Explain(ExplainArgs),
    /// What is enforced where, counters, last error, applied state checksum.
    Status {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The conntrack table as flows.
    Flows {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove every program, link and pin the agent made.
    Detach {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Hook {
    Xdp,
    Tc,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// State file (native TOML or AWS JSON); watched for changes.
    #[arg(long)]
    pub state: PathBuf,
    /// Bind a local interface to a network interface of the state explicitly.
    #[arg(long, value_name = "IFACE=ENI", value_parser = parse_attach)]
    pub attach: Vec<(String, String)>,
    /// Where maps and links are pinned (on a bpffs; mounted when missing).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Ingress hook: tc (default; keeps TSO/GRO on veth) or xdp (earliest drop).
    #[arg(long, value_enum, default_value = "tc")]
    pub ingress_hook: Hook,
    /// Enforce interfaces that have no security groups (drop all but infrastructure).
    #[arg(long)]
    pub default_deny: bool,
    /// Strict mode: drop tracked connections that a new policy no longer allows.
    #[arg(long)]
    pub revalidate: bool,
    /// Serve GET /status and /metrics over HTTP on this address (off unless given).
    #[arg(long, value_name = "ADDR")]
    pub api: Option<std::net::SocketAddr>,
    /// Directory for the agent's own files (default: /run/sg/<pin dir>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Capacity of the established-connection table.
    #[arg(long, default_value_t = sg_common::DEFAULT_CT_ENTRIES)]
    pub conntrack_size: u32,
    /// Capacity of the new-connection (embryonic) table.
    #[arg(long, default_value_t = sg_common::DEFAULT_CT_NEW_ENTRIES)]
    pub conntrack_new_size: u32,
    /// Seconds between conntrack garbage collections.
    #[arg(long, default_value_t = 10)]
    pub gc_interval: u64,
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    #[arg(long)]
    pub state: PathBuf,
    /// Network interface id.
    #[arg(long)]
    pub eni: String,
    #[arg(long, value_parser = ["ingress", "egress"])]
    pub direction: String,
    /// tcp, udp, icmp, icmpv6, all or a protocol number.
    #[arg(long)]
    pub protocol: String,
    /// The other side: source for ingress, destination for egress.
    #[arg(long)]
    pub remote: IpAddr,
    /// Destination port (TCP/UDP).
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long)]
    pub icmp_type: Option<u8>,
    #[arg(long)]
    pub icmp_code: Option<u8>,
}

fn parse_attach(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((i, e)) if !i.is_empty() && !e.is_empty() => Ok((i.to_string(), e.to_string())),
        _ => Err(format!("{s:?}: expected IFACE=ENI_ID")),
    }
}

/// Parses arguments; help and version exit 0, bad usage 64.
pub fn parse() -> Result<Cli, ExitCode> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) => {
            let _ = e.print();
            Err(if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Validate { state } => validate(&state),
        Command::Explain(args) => explain(&args),
        Command::Run(args) => run(args),
        Command::Status { pin_dir, json } => status(&pin_dir, json),
        Command::Flows { pin_dir, json } => flows(&pin_dir, json),
        Command::Detach { pin_dir } => detach(&pin_dir),
    }
}

fn validate(path: &std::path::Path) -> ExitCode {
    match source::load_file(path) {
        Ok(l) => {
            println!(
                "OK {}: {} security groups, {} network interfaces, {} prefix lists (sha256 {})",
                path.display(),
                l.state.security_groups.len(),
                l.state.network_interfaces.len(),
                l.state.prefix_lists.len(),
                l.sha256
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            eprintln!("{}: {} error(s)", path.display(), e.problems.len());
            ExitCode::FAILURE
        }
    }
}

fn explain(a: &ExplainArgs) -> ExitCode {
    let loaded = match source::load_file(&a.state) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if loaded.state.interface(&a.eni).is_none() {
        eprintln!("{}: no network interface {:?}", a.state.display(), a.eni);
        return ExitCode::FAILURE;
    }
    let Some(protocol) = Protocol::parse(&a.protocol) else {
        eprintln!(
            "--protocol {:?}: use tcp, udp, icmp, icmpv6, all or a number 0-255",
            a.protocol
        );
        return ExitCode::from(EXIT_USAGE);
    };
    let direction = if a.direction == "ingress" {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    let number = match protocol {
        Protocol::All => sg_common::PROTO_TCP,
        Protocol::Number(n) => n,
    };
    let port = if protocol.is_icmp() {
        let t = a.icmp_type.unwrap_or(if number == sg_common::PROTO_ICMP {
            8
        } else {
            128
        });
        (t as u16) << 8 | a.icmp_code.unwrap_or(0) as u16
    } else {
        a.port.unwrap_or(0)
    };
    let packet = Packet {
        direction,
        protocol: number,
        remote: a.remote,
        port,
    };
    match eval::evaluate(&loaded.state, &a.eni, &packet, false) {
        Verdict::Allow(m) => {
            let peer_word = if direction == Direction::Ingress {
                "from"
            } else {
                "to"
            };
            println!(
                "ALLOW by {} ({}) {direction} rule #{}: {} {} {peer_word} {}{}{}",
                m.group_id,
                m.group_name,
                m.rule_index,
                m.rule.protocol,
                m.rule.ports,
                m.peer,
                m.rule
                    .description
                    .as_deref()
                    .map(|d| format!(" \"{d}\""))
                    .unwrap_or_default(),
                if m.untracked { " (untracked flow)" } else { "" }
            );
        }
        Verdict::Deny => {
            let groups = loaded
                .state
                .interface(&a.eni)
                .map(|n| n.groups.join(", "))
                .unwrap_or_default();
            println!(
                "DENY no {direction} rule of [{groups}] allows {} {} {}",
                protocol,
                a.remote,
                port_text(protocol, port)
            );
        }
        Verdict::NotEnforced => {
            println!("ALLOW (not enforced: {} has no security groups; run with --default-deny to enforce it)", a.eni);
        }
    }
    ExitCode::SUCCESS
}

fn port_text(protocol: Protocol, port: u16) -> String {
    if protocol.is_icmp() {
        format!("type {} code {}", port >> 8, port & 0xff)
    } else if protocol.has_ports() {
        format!("port {port}")
    } else {
        String::new()
    }
}

fn run(a: RunArgs) -> ExitCode {
    let run_dir = a
        .run_dir
        .clone()
        .unwrap_or_else(|| agent::default_run_dir(&a.pin_dir));
    let opts = RunOptions {
        state: a.state,
        attach: a.attach,
        pin_dir: a.pin_dir,
        run_dir,
        hook: match a.ingress_hook {
            Hook::Xdp => IngressHook::Xdp,
            Hook::Tc => IngressHook::Tc,
        },
        default_deny: a.default_deny,
        revalidate: a.revalidate,
        api: a.api,
        sizes: MapSizes {
            conntrack: a.conntrack_size,
            conntrack_new: a.conntrack_new_size,
            ..MapSizes::default()
        },
        tick: Duration::from_millis(500),
        gc_interval: Duration::from_secs(a.gc_interval.max(1)),
    };
    let agent = match Agent::start(opts) {
        Ok(agent) => agent,
        Err(e) => {
            eprintln!("sg-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    match agent.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sg-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// (direction, counter name, value) for every counter slot with a name.
pub fn counter_rows(c: &Counters) -> Vec<(&'static str, String, u64)> {
    let mut rows = Vec::new();
    for (dir, dname) in [(DIR_INGRESS, "ingress"), (DIR_EGRESS, "egress")] {
        for (slot, name) in counter::NAMES.iter().enumerate() {
            rows.push((
                dname,
                name.to_string(),
                c.v[Counters::index(dir, slot as u32)],
            ));
        }
        for reason in 1..drop_reason::COUNT {
            let name = format!("dropped_{}", drop_reason::NAMES[reason as usize]);
            rows.push((
                dname,
                name,
                c.v[Counters::index(dir, counter::drop_slot(reason))],
            ));
        }
    }
    rows
}

fn status(pin_dir: &std::path::Path, json: bool) -> ExitCode {
    if !pin_dir.exists() {
        eprintln!(
            "{}: no pins; sg-agent has not run with this --pin-dir",
            pin_dir.display()
        );
        return ExitCode::FAILURE;
    }
    let (doc, ifaces) = match datapath::pinned_status(pin_dir) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("sg-agent status: {e}");
            return ExitCode::FAILURE;
        }
    };
    let doc: serde_json::Value = doc
        .and_then(|d| serde_json::from_str(&d).ok())
        .unwrap_or(serde_json::Value::Null);
    let names: std::collections::BTreeMap<u32, String> = system::interfaces()
        .unwrap_or_default()
        .into_iter()
        .map(|h| (h.ifindex, h.name))
        .collect();
    let interfaces: Vec<serde_json::Value> = ifaces
        .iter()
        .map(|(ifindex, (config, counters))| {
            let mut by_dir = serde_json::Map::new();
            for (dir, name, value) in counter_rows(counters) {
                by_dir
                    .entry(dir)
                    .or_insert_with(|| serde_json::json!({}))
                    .as_object_mut()
                    .expect("object")
                    .insert(name, value.into());
            }
            let eni = doc["interfaces"]
                .as_array()
                .and_then(|a| a.iter().find(|i| i["ifindex"] == *ifindex))
                .map(|i| i["network_interface"].clone())
                .unwrap_or(serde_json::Value::Null);
            let timeouts: serde_json::Map<String, serde_json::Value> = ct::TIMEOUT_NAMES
                .iter()
                .zip(config.timeouts.iter())
                .map(|(n, v)| (n.to_string(), (*v).into()))
                .collect();
            serde_json::json!({
                "ifindex": ifindex,
                "name": names.get(ifindex),
                "network_interface": eni,
                "counters": by_dir,
                "timeouts": timeouts,
            })
        })
        .collect();
    let agent_running = doc["agent_pid"]
        .as_u64()
        .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
    let out = serde_json::json!({
        "pin_dir": pin_dir,
        "agent_running": agent_running,
        "applied_state_sha256": doc["applied_state_sha256"],
        "state_path": doc["state_path"],
        "last_error": doc["last_error"],
        "ingress_hook": doc["ingress_hook"],
        "interfaces": interfaces,
        "agent": doc,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!("pins:            {}", pin_dir.display());
    println!("agent running:   {agent_running}");
    println!(
        "state:           {}",
        out["state_path"].as_str().unwrap_or("-")
    );
    println!(
        "applied sha256:  {}",
        out["applied_state_sha256"].as_str().unwrap_or("-")
    );
    println!(
        "ingress hook:    {}",
        out["ingress_hook"].as_str().unwrap_or("-")
    );
    println!(
        "last error:      {}",
        out["last_error"].as_str().unwrap_or("none")
    );
    for i in &interfaces {
        println!(
            "\n{} (ifindex {}) = {}",
            i["name"].as_str().unwrap_or("?"),
            i["ifindex"],
            i["network_interface"].as_str().unwrap_or("?")
        );
        for dir in ["ingress", "egress"] {
            let nonzero: Vec<String> = i["counters"][dir]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| v.as_u64() != Some(0))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!(
                "  {dir:<8} {}",
                if nonzero.is_empty() {
                    "-".to_string()
                } else {
                    nonzero.join(" ")
                }
            );
        }
    }
    ExitCode::SUCCESS
}

fn tcp_state_name(s: u8) -> &'static str {
    match s {
        ct::TCP_SYN_SENT => "syn_sent",
        ct::TCP_SYN_RECV => "syn_received",
        ct::TCP_ESTABLISHED => "established",
        ct::TCP_FIN_WAIT => "fin_wait",
        ct::TCP_TIME_WAIT => "time_wait",
        ct::TCP_CLOSE => "close",
        _ => "",
    }
}

fn flows(pin_dir: &std::path::Path, json: bool) -> ExitCode {
    let flows = match datapath::pinned_flows(pin_dir) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("sg-agent flows: {e}");
            return ExitCode::FAILURE;
        }
    };
    let now = system::boot_ns();
    let rows: Vec<serde_json::Value> = flows
        .iter()
        .map(|(k, e, established)| {
            let echo = matches!(k.protocol, sg_common::PROTO_ICMP | sg_common::PROTO_ICMPV6) && u16::from_be_bytes(k.remote_port) & 0x100 != 0;
            serde_json::json!({
                "ifindex": k.ifindex,
                "protocol": Protocol::Number(k.protocol).to_string(),
                "local": addr_of(k.family, &k.local).to_string(),
                "local_port": if echo { serde_json::Value::Null } else { u16::from_be_bytes(k.local_port).into() },
                "remote": addr_of(k.family, &k.remote).to_string(),
                "remote_port": if echo { serde_json::Value::Null } else { u16::from_be_bytes(k.remote_port).into() },
                "icmp_id": if echo { u16::from_be_bytes(k.local_port).into() } else { serde_json::Value::Null },
                "origin": if e.origin == DIR_INGRESS { "ingress" } else { "egress" },
                "tcp_state": tcp_state_name(e.tcp_state),
                "assured": established,
                "packets": { "ingress": e.packets[0], "egress": e.packets[1] },
                "bytes": { "ingress": e.bytes[0], "egress": e.bytes[1] },
                "rule_id": e.rule_id,
                "idle_seconds": now.saturating_sub(e.last_seen_ns) / 1_000_000_000,
            })
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<7} {:<6} {:<40} {:<40} {:<8} {:<12} {:>8}",
        "ifindex", "proto", "local", "remote", "origin", "state", "idle s"
    );
    for r in &rows {
        let ep = |a: &serde_json::Value, p: &serde_json::Value| match p.as_u64() {
            Some(p) => format!("{}:{p}", a.as_str().unwrap_or("")),
            None => a.as_str().unwrap_or("").to_string(),
        };
        println!(
            "{:<7} {:<6} {:<40} {:<40} {:<8} {:<12} {:>8}",
            r["ifindex"],
            r["protocol"].as_str().unwrap_or(""),
            ep(&r["local"], &r["local_port"]),
            ep(&r["remote"], &r["remote_port"]),
            r["origin"].as_str().unwrap_or(""),
            r["tcp_state"].as_str().unwrap_or(""),
            r["idle_seconds"]
        );
    }
    ExitCode::SUCCESS
}

fn detach(pin_dir: &std::path::Path) -> ExitCode {
    if !pin_dir.exists() {
        println!("nothing to detach at {}", pin_dir.display());
        return ExitCode::SUCCESS;
    }
    let mut removed = 0;
    let mut failed = false;
    let links = pin_dir.join("links");
    for entry in std::fs::read_dir(&links).into_iter().flatten().flatten() {
        match datapath::unpin_link(&entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => {
                eprintln!("{e}");
                failed = true;
            }
        }
    }
    let _ = std::fs::remove_dir(&links);
    for name in sg_common::ALL_MAPS {
        let p = pin_dir.join(name);
        if p.exists() {
            match std::fs::remove_file(&p) {
                Ok(()) => removed += 1,
                Err(e) => {
                    eprintln!("removing {}: {e}", p.display());
                    failed = true;
                }
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(pin_dir) {
        eprintln!("removing {}: {e}", pin_dir.display());
        failed = true;
    }
    let _ = std::fs::remove_dir_all(agent::default_run_dir(pin_dir));
    println!(
        "detached: removed {removed} pins from {}",
        pin_dir.display()
    );
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
