//! `sg-agent validate` and `sg-agent explain`: what a state file says, without touching
//! the system.

#![forbid(unsafe_code)]

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use clap::Args;

use super::EXIT_USAGE;
use crate::{
    eval::{self, Packet, Verdict},
    model::{Direction, Protocol},
    source,
};

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// Explain what this state file says.
    #[arg(long, required_unless_present = "live", conflicts_with = "live")]
    pub state: Option<PathBuf>,
    /// Explain from the kernel's maps as they are programmed now, including a tracked
    /// flow the packet belongs to.
    #[arg(long)]
    pub live: bool,
    /// Pin directory of the agent (with --live).
    #[arg(long, default_value = super::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
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

/// A problem as `validate --json` prints it.
fn problem_json(p: &crate::model::Problem) -> serde_json::Value {
    serde_json::json!({
        "object": p.object,
        "field": p.field,
        "message": p.message,
        "line": p.line,
    })
}

pub(super) fn validate(path: &std::path::Path, json: bool) -> ExitCode {
    match source::load_file(path) {
        Ok(l) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "valid": true,
                        "file": path,
                        "sha256": l.sha256,
                        "errors": [],
                        "warnings": l.state.warnings.iter().map(problem_json).collect::<Vec<_>>(),
                    })
                );
                return ExitCode::SUCCESS;
            }
            for w in &l.state.warnings {
                eprintln!("warning: {}: {w}", path.display());
            }
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
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "valid": false,
                        "file": path,
                        "errors": e.problems.iter().map(problem_json).collect::<Vec<_>>(),
                        "warnings": [],
                    })
                );
                return ExitCode::FAILURE;
            }
            eprintln!("{e}");
            eprintln!("{}: {} error(s)", path.display(), e.problems.len());
            ExitCode::FAILURE
        }
    }
}

/// The usage mistakes of `explain`, found before anything is read: TCP and UDP need a
/// port, ICMP takes a type and code instead, and the remote address must be of the
/// protocol's family.
fn explain_usage(a: &ExplainArgs, protocol: Protocol) -> Result<(), String> {
    let icmp_fields = a.icmp_type.is_some() || a.icmp_code.is_some();
    if protocol.has_ports() && a.port.is_none() {
        return Err(format!("--port is required for {protocol}"));
    }
    if protocol.is_icmp() && a.port.is_some() {
        return Err(format!(
            "--port does not apply to {protocol}: give --icmp-type and --icmp-code"
        ));
    }
    if !protocol.has_ports() && !protocol.is_icmp() && a.port.is_some() {
        return Err(format!("--port does not apply to protocol {protocol}"));
    }
    if !protocol.is_icmp() && icmp_fields {
        return Err(format!(
            "--icmp-type and --icmp-code apply to icmp and icmpv6, not {protocol}"
        ));
    }
    match (protocol, a.remote) {
        (Protocol::Number(sg_common::PROTO_ICMP), IpAddr::V6(_)) => {
            Err("icmp is IPv4's; for an IPv6 --remote use --protocol icmpv6".into())
        }
        (Protocol::Number(sg_common::PROTO_ICMPV6), IpAddr::V4(_)) => {
            Err("icmpv6 is IPv6's; for an IPv4 --remote use --protocol icmp".into())
        }
        _ => Ok(()),
    }
}

/// What `explain` found, in either form.
#[derive(Default)]
struct Explanation {
    allow: bool,
    not_enforced: bool,
    group_id: Option<String>,
    group_name: Option<String>,
    rule_id: Option<String>,
    /// The rule in words: `tcp 5432 from sg-web` (or the programmed prefix when live).
    rule: Option<String>,
    description: Option<String>,
    untracked: bool,
    /// The interface's groups (for a denial).
    groups: Vec<String>,
    /// Live only: the tracked flow the packet belongs to, in `flows --json` shape.
    tracked_flow: Option<serde_json::Value>,
}

pub(super) fn explain(a: &ExplainArgs) -> ExitCode {
    let Some(protocol) = Protocol::parse(&a.protocol) else {
        eprintln!(
            "--protocol {:?}: use tcp, udp, icmp, icmpv6, all or a number 0-255",
            a.protocol
        );
        return ExitCode::from(EXIT_USAGE);
    };
    if let Err(e) = explain_usage(a, protocol) {
        eprintln!("sg-agent explain: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
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
    let found = match &a.state {
        Some(path) => from_state(path, &a.eni, &packet),
        None => from_maps(&a.pin_dir, &a.eni, &packet),
    };
    let x = match found {
        Ok(x) => x,
        Err(e) => {
            eprintln!("sg-agent explain: {e}");
            return ExitCode::FAILURE;
        }
    };
    let peer_word = if direction == Direction::Ingress {
        "from"
    } else {
        "to"
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "verdict": if x.allow { "ALLOW" } else { "DENY" },
                "source": if a.state.is_some() { "state" } else { "live" },
                "network_interface": a.eni,
                "direction": direction.to_string(),
                "protocol": protocol.to_string(),
                "remote": a.remote.to_string(),
                "port": (protocol.has_ports()).then_some(port),
                "icmp_type": protocol.is_icmp().then_some(port >> 8),
                "icmp_code": protocol.is_icmp().then_some(port & 0xff),
                "not_enforced": x.not_enforced,
                "group_id": x.group_id,
                "group_name": x.group_name,
                "rule_id": x.rule_id,
                "rule": x.rule,
                "description": x.description,
                "untracked": x.untracked,
                "groups": x.groups,
                "tracked_flow": x.tracked_flow,
            }))
            .unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    if x.not_enforced {
        println!("ALLOW (not enforced: {} has no security groups; run with --default-deny to enforce it)", a.eni);
    } else if x.allow {
        println!(
            "ALLOW by {} ({}) {direction} rule {}: {}{}{}",
            x.group_id.as_deref().unwrap_or("-"),
            x.group_name.as_deref().unwrap_or("-"),
            x.rule_id.as_deref().unwrap_or("-"),
            x.rule.as_deref().unwrap_or("-"),
            x.description
                .as_deref()
                .map(|d| format!(" \"{d}\""))
                .unwrap_or_default(),
            if x.untracked { " (untracked flow)" } else { "" }
        );
    } else {
        println!(
            "DENY no {direction} rule of [{}] allows {} {peer_word} {} {}",
            x.groups.join(", "),
            protocol,
            a.remote,
            port_text(protocol, port)
        );
    }
    if let Some(f) = &x.tracked_flow {
        println!(
            "tracked flow: {} {}:{} {} {}:{} opened on {} by rule {} ({}), tcp state {}, idle {} s",
            f["protocol"].as_str().unwrap_or(""),
            f["local"].as_str().unwrap_or(""),
            f["local_port"],
            if direction == Direction::Ingress {
                "<-"
            } else {
                "->"
            },
            f["remote"].as_str().unwrap_or(""),
            f["remote_port"],
            f["origin"].as_str().unwrap_or(""),
            f["rule_id"].as_str().unwrap_or("-"),
            f["group_id"].as_str().unwrap_or("-"),
            match f["tcp_state"].as_str() {
                Some("") | None => "-",
                Some(s) => s,
            },
            f["idle_seconds"]
        );
    }
    ExitCode::SUCCESS
}

/// The verdict of the state file, by the reference evaluator.
fn from_state(path: &std::path::Path, eni: &str, packet: &Packet) -> Result<Explanation, String> {
    let loaded = source::load_file(path).map_err(|e| e.to_string())?;
    let Some(ni) = loaded.state.interface(eni) else {
        return Err(format!("{}: no network interface {eni:?}", path.display()));
    };
    let groups = ni.groups.clone();
    let peer_word = if packet.direction == Direction::Ingress {
        "from"
    } else {
        "to"
    };
    Ok(match eval::evaluate(&loaded.state, eni, packet, false) {
        Verdict::Allow(m) => {
            let rules = loaded
                .state
                .group(&m.group_id)
                .map(|g| g.rules(packet.direction).to_vec())
                .unwrap_or_default();
            let ids = crate::compile::stable_rule_ids(&m.group_id, packet.direction, &rules);
            Explanation {
                allow: true,
                rule_id: ids.get(m.rule_index).cloned(),
                rule: Some(format!(
                    "{} {} {peer_word} {}",
                    m.rule.protocol, m.rule.ports, m.peer
                )),
                description: m.rule.description.clone(),
                group_id: Some(m.group_id),
                group_name: Some(m.group_name),
                untracked: m.untracked,
                groups,
                ..Explanation::default()
            }
        }
        Verdict::Deny => Explanation {
            groups,
            ..Explanation::default()
        },
        Verdict::NotEnforced => Explanation {
            allow: true,
            not_enforced: true,
            ..Explanation::default()
        },
    })
}

/// The verdict the programmed maps give now (the datapath's own lookup, mirrored), and
/// the tracked flow the packet belongs to, if any.
fn from_maps(pin_dir: &std::path::Path, eni: &str, packet: &Packet) -> Result<Explanation, String> {
    use crate::{compile::PlanVerdict, datapath::Tables};
    if !pin_dir.exists() {
        return Err(format!(
            "{}: no pins; sg-agent has not run with this --pin-dir",
            pin_dir.display()
        ));
    }
    let plan = crate::agent::pinned_plan(pin_dir).map_err(|e| e.to_string())?;
    let Some((ifindex, _)) = plan.interfaces.iter().find(|(_, p)| p.eni == eni) else {
        return Ok(Explanation {
            allow: true,
            not_enforced: true,
            ..Explanation::default()
        });
    };
    let ifindex = *ifindex;
    let status = crate::status::pinned_document(pin_dir).map_err(|e| e.to_string())?;
    let groups: Vec<String> = status["interfaces"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["ifindex"] == ifindex))
        .and_then(|i| i["groups"].as_array())
        .map(|g| {
            g.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut x = match plan.lookup(
        ifindex,
        packet.direction,
        packet.remote,
        packet.protocol,
        packet.port,
    ) {
        PlanVerdict::NotEnforced => Explanation {
            allow: true,
            not_enforced: true,
            ..Explanation::default()
        },
        PlanVerdict::Deny => Explanation {
            groups,
            ..Explanation::default()
        },
        PlanVerdict::Allow(grant) => {
            let info = plan.rules.get(&grant.rule_id);
            let peer_word = if packet.direction == Direction::Ingress {
                "from"
            } else {
                "to"
            };
            // The programmed prefix that matched: the longest one holding the remote.
            let bits = crate::net::Family::of(&packet.remote).bits();
            let prefix = (0..=bits)
                .rev()
                .map(|len| crate::net::Cidr::truncate(packet.remote, len))
                .find(|c| {
                    plan.prefixes.contains_key(&crate::compile::PrefixKey {
                        ifindex,
                        direction: packet.direction,
                        cidr: *c,
                    })
                });
            Explanation {
                allow: true,
                group_id: info.map(|i| i.key.group.clone()),
                group_name: info.map(|i| i.group_name.clone()),
                rule_id: Some(
                    info.map_or_else(|| format!("#{}", grant.rule_id), |i| i.stable_id.clone()),
                ),
                rule: info.map(|i| {
                    format!(
                        "{} {} {peer_word} {}",
                        i.key.protocol,
                        i.key.ports,
                        prefix.map(|c| c.to_string()).unwrap_or_default()
                    )
                }),
                description: info.and_then(|i| i.description.clone()),
                untracked: grant.flags != 0,
                groups,
                ..Explanation::default()
            }
        }
    };
    // A tracked flow this packet belongs to: same interface, protocol and remote, the
    // port on the side the packet's direction names.
    let flows = Tables::Pinned(pin_dir).flows().map_err(|e| e.to_string())?;
    let now = crate::sys::boot_ns()
        + Tables::Pinned(pin_dir)
            .global()
            .map(|g| g.clock_offset_ns)
            .unwrap_or(0);
    let timeouts = plan.interfaces[&ifindex].config.timeouts;
    x.tracked_flow = flows
        .iter()
        .find(|(k, e, _)| {
            let live = crate::conntrack::is_live(k, e, &timeouts, now);
            let port_ok = match packet.protocol {
                sg_common::PROTO_TCP | sg_common::PROTO_UDP => {
                    let p = match packet.direction {
                        Direction::Ingress => k.local_port,
                        Direction::Egress => k.remote_port,
                    };
                    u16::from_be_bytes(p) == packet.port
                }
                _ => true,
            };
            k.ifindex == ifindex
                && k.protocol == packet.protocol
                && crate::datapath::addr_of(k.family, &k.remote) == packet.remote
                && port_ok
                && live
        })
        .map(|f| crate::conntrack::flow_json(f, now, &plan.rules));
    Ok(x)
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
