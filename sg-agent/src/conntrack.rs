//! The conntrack tables seen from user space: garbage collection of expired flows (the
//! datapath already treats them as absent), strict-mode revalidation (SPEC §1.10), and
//! flows as rows in security-group terms.

#![forbid(unsafe_code)]

use sg_common::{
    ct, CtKey, DIR_INGRESS, ECHO_PORT_MARK, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

use crate::{
    compile::Plan,
    datapath::{addr_of, direction_of, Datapath, DatapathError, FlowRow},
    model::Protocol,
    sys,
};

/// Deletes expired flows; returns them as they were (for the flow log's last records).
pub fn gc(dp: &mut Datapath, plan: &Plan) -> Result<Vec<FlowRow>, DatapathError> {
    let offset = dp.global()?.clock_offset_ns;
    let now = sys::boot_ns() + offset;
    let mut expired = Vec::new();
    for (key, entry, established) in dp.tables().flows()? {
        let timeouts = plan
            .interfaces
            .get(&key.ifindex)
            .map_or(ct::DEFAULT_TIMEOUTS, |i| i.config.timeouts);
        let slot = ct::timeout_slot(key.protocol, entry.tcp_state, entry.flags);
        if ct::is_expired(now, entry.last_seen_ns, timeouts[slot]) {
            expired.push((key, entry, established));
        }
    }
    let keys: Vec<(CtKey, bool)> = expired.iter().map(|(k, _, e)| (*k, *e)).collect();
    dp.delete_flows(&keys)?;
    Ok(expired)
}

/// Strict mode (SPEC §1.10): drops tracked flows whose opening packet the plan no longer
/// allows; returns how many.
pub fn revalidate(dp: &mut Datapath, plan: &Plan) -> Result<usize, DatapathError> {
    let mut stale = Vec::new();
    for (key, entry, established) in dp.tables().flows()? {
        if !plan.interfaces.contains_key(&key.ifindex) {
            continue;
        }
        let (proto, port) = opening_port(&key, entry.origin);
        let remote = addr_of(key.family, &key.remote);
        if !plan
            .lookup(key.ifindex, direction_of(entry.origin), remote, proto, port)
            .allows()
        {
            stale.push((key, established));
        }
    }
    dp.delete_flows(&stale)
}

/// Whether a flow still carries traffic: not expired, and for TCP not closing (a new
/// connection's packets never belong to it).
pub fn is_live(
    key: &CtKey,
    entry: &sg_common::CtEntry,
    timeouts: &[u32; ct::TIMEOUT_COUNT],
    now: u64,
) -> bool {
    !matches!(entry.tcp_state, ct::TCP_TIME_WAIT | ct::TCP_CLOSE)
        && !ct::is_expired(
            now,
            entry.last_seen_ns,
            timeouts[ct::timeout_slot(key.protocol, entry.tcp_state, entry.flags)],
        )
}

/// Whether a flow key is an ICMP query flow (identifier in `local_port`).
fn is_echo(key: &CtKey) -> bool {
    matches!(key.protocol, PROTO_ICMP | PROTO_ICMPV6)
        && u16::from_be_bytes(key.remote_port) & ECHO_PORT_MARK != 0
}

/// The request type of an ICMP query flow's key (`sg_common::icmp_query_port`).
fn query_request_type(key: &CtKey) -> u8 {
    let pair = (u16::from_be_bytes(key.remote_port) >> 1) as u8 & 3;
    ct::icmp_query_request(key.protocol == PROTO_ICMPV6, pair)
}

/// The protocol and policy port of the packet that opened a tracked flow.
pub fn opening_port(key: &CtKey, origin: u8) -> (u8, u16) {
    let local = u16::from_be_bytes(key.local_port);
    let remote = u16::from_be_bytes(key.remote_port);
    let port = match key.protocol {
        PROTO_TCP | PROTO_UDP => {
            if origin == DIR_INGRESS {
                local
            } else {
                remote
            }
        }
        // Query flows: the request's type, code 0.
        PROTO_ICMP | PROTO_ICMPV6 if is_echo(key) => (query_request_type(key) as u16) << 8,
        _ => 0,
    };
    (key.protocol, port)
}

pub fn tcp_state_name(s: u8) -> &'static str {
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

/// A flow as `sg-agent flows --json` prints it; `now` is the boot clock and `rules` the
/// rule metadata that names the rule that admitted it.
pub fn flow_json(
    (k, e, established): &FlowRow,
    now: u64,
    rules: &std::collections::BTreeMap<u32, crate::compile::RuleInfo>,
) -> serde_json::Value {
    let rule = rules.get(&e.rule_id);
    let echo = is_echo(k);
    let port = |p: [u8; 2]| -> serde_json::Value {
        if echo {
            serde_json::Value::Null
        } else {
            u16::from_be_bytes(p).into()
        }
    };
    serde_json::json!({
        "ifindex": k.ifindex,
        "protocol": Protocol::Number(k.protocol).to_string(),
        "local": addr_of(k.family, &k.local).to_string(),
        "local_port": port(k.local_port),
        "remote": addr_of(k.family, &k.remote).to_string(),
        "remote_port": port(k.remote_port),
        "icmp_id": if echo { u16::from_be_bytes(k.local_port).into() } else { serde_json::Value::Null },
        "origin": if e.origin == DIR_INGRESS { "ingress" } else { "egress" },
        "tcp_state": tcp_state_name(e.tcp_state),
        "assured": established,
        "packets": { "ingress": e.packets[0], "egress": e.packets[1] },
        "bytes": { "ingress": e.bytes[0], "egress": e.bytes[1] },
        "rule_id": match (rule, e.rule_id) {
            (Some(r), _) => r.stable_id.clone().into(),
            (None, 0) => serde_json::Value::Null,
            (None, n) => format!("#{n}").into(),
        },
        "group_id": rule.map(|r| r.key.group.clone()),
        "idle_seconds": now.saturating_sub(e.last_seen_ns) / 1_000_000_000,
    })
}
