//! Flow events from the datapath (`SG_EVENTS_V2`, a ring buffer): admitted flows and
//! rate-limited denials, decoded into security-group terms (the running agent reads the
//! ring: `agent::ring`).

#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use sg_common::{FlowEvent, DIR_INGRESS, EVENT_ADMITTED, EVENT_AUDITED};

use crate::{datapath::addr_of, model::Direction};

/// One event in user terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Boot clock of the packet (plus the datapath's test offset), nanoseconds.
    pub time_ns: u64,
    pub ifindex: u32,
    pub admitted: bool,
    /// Would have been denied; passed because the interface is in audit mode.
    pub audited: bool,
    /// The rule that admitted the flow (0 for denials).
    pub rule_id: u32,
    /// Why the packet was (or, audited, would have been) dropped: `drop_reason::*`; 0
    /// for admitted flows.
    pub reason: u32,
    /// Bytes of the frame.
    pub bytes: u32,
    pub tcp_flags: u8,
    pub direction: Direction,
    pub protocol: u8,
    pub local: IpAddr,
    pub local_port: u16,
    pub remote: IpAddr,
    pub remote_port: u16,
}

/// Decodes one ring-buffer record; None when it is not a whole `FlowEvent`.
pub fn decode(record: &[u8]) -> Option<Event> {
    if record.len() < std::mem::size_of::<FlowEvent>() {
        return None;
    }
    // The record is the struct's bytes as the kernel wrote them (repr(C), no padding
    // holes): read it field by field from the byte layout.
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(record[at..at + 4].try_into().ok()?))
    };
    let e = FlowEvent {
        time_ns: u64::from_ne_bytes(record[0..8].try_into().ok()?),
        ifindex: u32_at(8)?,
        detail: u32_at(12)?,
        kind: record[16],
        direction: record[17],
        family: record[18],
        protocol: record[19],
        local_port: record[20..22].try_into().ok()?,
        remote_port: record[22..24].try_into().ok()?,
        local: record[24..40].try_into().ok()?,
        remote: record[40..56].try_into().ok()?,
        bytes: u32_at(56)?,
        tcp_flags: record[60],
        _pad: [0; 3],
    };
    let admitted = e.kind == EVENT_ADMITTED;
    Some(Event {
        time_ns: e.time_ns,
        ifindex: e.ifindex,
        admitted,
        audited: e.kind == EVENT_AUDITED,
        rule_id: if admitted { e.detail } else { 0 },
        reason: if admitted { 0 } else { e.detail },
        bytes: e.bytes,
        tcp_flags: e.tcp_flags,
        direction: if e.direction == DIR_INGRESS {
            Direction::Ingress
        } else {
            Direction::Egress
        },
        protocol: e.protocol,
        local: addr_of(e.family, &e.local),
        local_port: u16::from_be_bytes(e.local_port),
        remote: addr_of(e.family, &e.remote),
        remote_port: u16::from_be_bytes(e.remote_port),
    })
}

/// What an event's numbers mean: interface names and ENIs, rule ids and groups.
#[derive(Clone, Debug, Default)]
pub struct Labels {
    pub interfaces: BTreeMap<u32, InterfaceLabel>,
    /// Numeric rule id → (stable id, group id).
    pub rules: BTreeMap<u32, (String, String)>,
}

#[derive(Clone, Debug, Default)]
pub struct InterfaceLabel {
    pub name: String,
    pub eni: String,
    pub owner_id: Option<String>,
}

impl Labels {
    pub fn of(
        plan: &crate::compile::Plan,
        names: &BTreeMap<u32, String>,
        state: Option<&crate::model::State>,
    ) -> Labels {
        Labels {
            interfaces: plan
                .interfaces
                .iter()
                .map(|(ifindex, p)| {
                    let label = InterfaceLabel {
                        name: names.get(ifindex).cloned().unwrap_or_default(),
                        eni: p.eni.clone(),
                        owner_id: state
                            .and_then(|s| s.interface(&p.eni))
                            .and_then(|n| n.owner_id.clone()),
                    };
                    (*ifindex, label)
                })
                .collect(),
            rules: plan
                .rules
                .iter()
                .map(|(id, r)| (*id, (r.stable_id.clone(), r.key.group.clone())))
                .collect(),
        }
    }
}

/// An event as `sg-agent monitor --json` prints it.
pub fn event_json(e: &Event, labels: &Labels) -> serde_json::Value {
    let iface = labels.interfaces.get(&e.ifindex);
    let rule = labels.rules.get(&e.rule_id);
    serde_json::json!({
        "time_ns": e.time_ns,
        "verdict": if e.admitted { "admitted" } else if e.audited { "audited" } else { "denied" },
        "interface": iface.map(|i| i.name.clone()),
        "network_interface": iface.map(|i| i.eni.clone()),
        "ifindex": e.ifindex,
        "direction": e.direction.to_string(),
        "protocol": crate::model::Protocol::Number(e.protocol).to_string(),
        "local": e.local.to_string(),
        "local_port": e.local_port,
        "remote": e.remote.to_string(),
        "remote_port": e.remote_port,
        "bytes": e.bytes,
        "tcp_flags": e.tcp_flags,
        "group_id": rule.map(|r| r.1.clone()),
        "rule_id": rule.map(|r| r.0.clone()),
        "reason": (!e.admitted).then(|| reason_name(e.reason)),
    })
}

/// The socket `sg-agent monitor` reads events from.
pub fn monitor_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("monitor.sock")
}

/// The `sg-reason` of a drop reason (flow logs, monitor).
pub fn reason_name(reason: u32) -> &'static str {
    use sg_common::drop_reason;
    match reason {
        drop_reason::POLICY => "no-rule",
        drop_reason::CONNTRACK_FULL => "conntrack-full",
        r if r < drop_reason::COUNT => drop_reason::NAMES[r as usize],
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sg_common::{EVENT_DENIED, FAMILY_V4, PROTO_TCP};

    #[test]
    fn decodes_a_record_as_the_kernel_lays_it_out() {
        let mut local = [0u8; 16];
        local[..4].copy_from_slice(&[198, 18, 0, 1]);
        let mut remote = [0u8; 16];
        remote[..4].copy_from_slice(&[198, 18, 0, 9]);
        let mut record = Vec::new();
        record.extend_from_slice(&7u64.to_ne_bytes());
        record.extend_from_slice(&3u32.to_ne_bytes());
        record.extend_from_slice(&sg_common::drop_reason::POLICY.to_ne_bytes());
        record.extend_from_slice(&[EVENT_DENIED, DIR_INGRESS, FAMILY_V4, PROTO_TCP]);
        record.extend_from_slice(&22u16.to_be_bytes());
        record.extend_from_slice(&40000u16.to_be_bytes());
        record.extend_from_slice(&local);
        record.extend_from_slice(&remote);
        record.extend_from_slice(&74u32.to_ne_bytes());
        record.extend_from_slice(&[0x02, 0, 0, 0]);
        assert_eq!(record.len(), std::mem::size_of::<FlowEvent>());
        let e = decode(&record).expect("a whole record");
        assert!(!e.admitted && !e.audited);
        assert_eq!(
            (e.reason, e.rule_id, e.bytes, e.tcp_flags),
            (1, 0, 74, 0x02)
        );
        assert_eq!((e.ifindex, e.local_port, e.remote_port), (3, 22, 40000));
        assert_eq!(e.remote, "198.18.0.9".parse::<IpAddr>().unwrap());
        assert_eq!(e.direction, Direction::Ingress);
        assert!(decode(&record[..40]).is_none());
    }
}
