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
