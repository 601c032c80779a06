//! `sg-agent policy`: the effective policy per enforced interface, read back from the
//! kernel's maps and told in security-group terms (like `nft list ruleset` or `cilium
//! policy get`), with each rule's stable id and hit counter.

#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    path::Path,
    process::ExitCode,
};

use super::inspect::{check_pins, read_error};
use crate::{
    agent,
    compile::{Plan, RuleInfo},
    datapath::Tables,
    model::Direction,
    net::Cidr,
    sys,
};

/// One rule as the maps program it on one interface and direction.
struct ProgrammedRule {
    info: Option<RuleInfo>,
    numeric_id: u32,
    /// The prefixes it admits, without those inside another of its prefixes.
    peers: Vec<Cidr>,
    untracked: bool,
}

/// The rules programmed for `ifindex` in `direction`, in the order of their groups and
/// of the rules in each group.
fn programmed(plan: &Plan, ifindex: u32, direction: Direction) -> Vec<ProgrammedRule> {
    let mut by_rule: BTreeMap<u32, (BTreeSet<Cidr>, u32)> = BTreeMap::new();
    for (key, ruleset) in &plan.prefixes {
        if key.ifindex != ifindex || key.direction != direction {
            continue;
        }
        let Some(rs) = plan.rulesets.get(ruleset) else {
            continue;
        };
        // The grants when the agent's metadata names them; else the rule ids of the port
        // stage (a rule wholly overlapped by one with a smaller id is then not seen).
        let grants: Vec<(u32, u32)> = if rs.grants.is_empty() {
            rs.ports.values().map(|g| (g.rule_id, g.flags)).collect()
        } else {
            rs.grants.iter().map(|g| (g.rule_id, g.flags)).collect()
        };
        for (id, flags) in grants {
            let e = by_rule.entry(id).or_default();
            e.0.insert(key.cidr);
            e.1 |= flags;
        }
    }
    let mut rules: Vec<ProgrammedRule> = by_rule
        .into_iter()
        .map(|(id, (cidrs, flags))| ProgrammedRule {
            info: plan.rules.get(&id).cloned(),
            numeric_id: id,
            peers: outermost(cidrs),
            untracked: flags != 0,
        })
        .collect();
    rules.sort_by(|a, b| {
        let key = |r: &ProgrammedRule| {
            r.info
                .as_ref()
                .map(|i| (i.key.group.clone(), i.index))
                .unwrap_or_default()
        };
        key(a).cmp(&key(b)).then(a.numeric_id.cmp(&b.numeric_id))
    });
    rules
}

/// The prefixes not inside another one of the set (flattening splits a rule's range
/// where another rule's prefix overlaps it; the operator wrote the outer one).
fn outermost(cidrs: BTreeSet<Cidr>) -> Vec<Cidr> {
    let all: HashSet<Cidr> = cidrs.iter().copied().collect();
    cidrs
        .into_iter()
        .filter(|c| {
            (0..c.len()).all(|len| {
                let outer = Cidr::truncate(c.addr(), len);
                !all.contains(&outer)
            })
        })
        .collect()
}

fn rule_json(r: &ProgrammedRule, hits: &BTreeMap<u32, u64>) -> serde_json::Value {
    let info = r.info.as_ref();
    serde_json::json!({
        "rule_id": info.map_or_else(|| format!("#{}", r.numeric_id), |i| i.stable_id.clone()),
        "group_id": info.map(|i| i.key.group.clone()),
        "group_name": info.map(|i| i.group_name.clone()),
        "protocol": info.map(|i| i.key.protocol.to_string()),
        "ports": info.map(|i| i.key.ports.to_string()),
        "peers": r.peers.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "untracked": r.untracked,
        "description": info.and_then(|i| i.description.clone()),
        "hits": hits.get(&r.numeric_id).copied().unwrap_or(0),
    })
}

/// The effective policy as one JSON document: `{"interfaces": [...]}`.
pub fn policy_document(
    pin_dir: &Path,
    interface: Option<&str>,
) -> Result<serde_json::Value, String> {
    let plan = agent::pinned_plan(pin_dir).map_err(|e| e.to_string())?;
    let hits = Tables::Pinned(pin_dir)
        .rule_hits()
        .map_err(|e| e.to_string())?;
    let names: BTreeMap<u32, String> = sys::interfaces()
        .unwrap_or_default()
        .into_iter()
        .map(|h| (h.ifindex, h.name))
        .collect();
    let mut out = Vec::new();
    for (ifindex, p) in &plan.interfaces {
        let name = names.get(ifindex).cloned();
        if interface.is_some_and(|i| name.as_deref() != Some(i)) {
            continue;
        }
        let mut entry = serde_json::json!({
            "ifindex": ifindex,
            "name": name,
            "network_interface": p.eni,
        });
        for direction in Direction::BOTH {
            entry[direction.to_string()] = programmed(&plan, *ifindex, direction)
                .iter()
                .map(|r| rule_json(r, &hits))
                .collect::<Vec<_>>()
                .into();
        }
        out.push(entry);
    }
    if let Some(i) = interface {
        if out.is_empty() {
            return Err(format!("interface {i} is not enforced"));
        }
    }
    Ok(serde_json::json!({ "interfaces": out }))
}

pub(super) fn policy(pin_dir: &Path, interface: Option<&str>, json: bool) -> ExitCode {
    if let Err(code) = check_pins(pin_dir, "policy") {
        return code;
    }
    let doc = match policy_document(pin_dir, interface) {
        Ok(d) => d,
        Err(e) => {
            read_error("policy", &e);
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    for i in doc["interfaces"].as_array().into_iter().flatten() {
        println!(
            "interface {} ({}, ifindex {})",
            text(&i["name"]),
            text(&i["network_interface"]),
            i["ifindex"]
        );
        for direction in Direction::BOTH {
            let rules = i[direction.to_string()]
                .as_array()
                .cloned()
                .unwrap_or_default();
            println!("  {direction}: {} rules", rules.len());
            let peer_word = if direction == Direction::Ingress {
                "from"
            } else {
                "to"
            };
            for r in rules {
                let peers: Vec<String> = r["peers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(text)
                    .collect();
                let shown = if peers.len() > 8 {
                    format!("{} … ({} prefixes)", peers[..8].join(", "), peers.len())
                } else {
                    peers.join(", ")
                };
                println!(
                    "    {}  {} ({})  {} {} {peer_word} {shown}{}  hits {}",
                    text(&r["rule_id"]),
                    text(&r["group_id"]),
                    text(&r["group_name"]),
                    text(&r["protocol"]),
                    text(&r["ports"]),
                    if r["untracked"].as_bool() == Some(true) {
                        " (untracked)"
                    } else {
                        ""
                    },
                    r["hits"]
                );
            }
        }
    }
    ExitCode::SUCCESS
}

/// `sg-agent monitor`: the running agent's stream of flow events, filtered.
pub(super) fn monitor(
    pin_dir: &Path,
    interface: Option<&str>,
    drops: bool,
    json: bool,
) -> ExitCode {
    use std::io::{BufRead, BufReader};
    let socket = crate::events::monitor_socket(&agent::run_dir_of(pin_dir));
    let stream = match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "sg-agent monitor: {}: {e}; monitor needs the running agent of {} (it is the one reader of the kernel's event ring)",
                socket.display(),
                pin_dir.display()
            );
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "sg-agent monitor: listening on {} (Ctrl-C to stop)",
        socket.display()
    );
    let out = std::io::stdout();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let Ok(e) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if drops && e["verdict"] == "admitted" {
            continue;
        }
        if interface.is_some_and(|i| e["interface"].as_str() != Some(i)) {
            continue;
        }
        let text = if json {
            line
        } else {
            let endpoint = |a: &serde_json::Value, p: &serde_json::Value| {
                let a = a.as_str().unwrap_or("");
                if a.contains(':') {
                    format!("[{a}]:{p}")
                } else {
                    format!("{a}:{p}")
                }
            };
            let (from, to) = if e["direction"] == "ingress" {
                (
                    endpoint(&e["remote"], &e["remote_port"]),
                    endpoint(&e["local"], &e["local_port"]),
                )
            } else {
                (
                    endpoint(&e["local"], &e["local_port"]),
                    endpoint(&e["remote"], &e["remote_port"]),
                )
            };
            let why = if e["verdict"] == "admitted" {
                format!(
                    "by {} {}",
                    e["group_id"].as_str().unwrap_or("-"),
                    e["rule_id"].as_str().unwrap_or("-")
                )
            } else {
                format!("reason {}", e["reason"].as_str().unwrap_or("-"))
            };
            format!(
                "{:<8} {} ({}) {} {} {from} -> {to} {why}",
                e["verdict"].as_str().unwrap_or(""),
                e["interface"].as_str().unwrap_or("-"),
                e["network_interface"].as_str().unwrap_or("-"),
                e["direction"].as_str().unwrap_or(""),
                e["protocol"].as_str().unwrap_or(""),
            )
        };
        use std::io::Write;
        let mut out = out.lock();
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            return ExitCode::SUCCESS; // The reader went away (`| head`).
        }
    }
    eprintln!("sg-agent monitor: the agent closed the stream (it stopped)");
    ExitCode::SUCCESS
}
