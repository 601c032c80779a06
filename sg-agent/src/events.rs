//! Flow events from the datapath (`SG_EVENTS`, a ring buffer): admitted flows and
//! rate-limited denials, decoded into security-group terms for flow logs and `monitor`.

#![forbid(unsafe_code)]

use std::net::IpAddr;

use sg_common::{FlowEvent, DIR_INGRESS, EVENT_ADMITTED};

use crate::{datapath::addr_of, model::Direction};

/// One event in user terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Boot clock of the packet (plus the datapath's test offset), nanoseconds.
    pub time_ns: u64,
    pub ifindex: u32,
    pub admitted: bool,
    /// The rule that admitted the flow (0 for denials).
    pub rule_id: u32,
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
    let e = FlowEvent {
        time_ns: u64::from_ne_bytes(record[0..8].try_into().ok()?),
        ifindex: u32::from_ne_bytes(record[8..12].try_into().ok()?),
        rule_id: u32::from_ne_bytes(record[12..16].try_into().ok()?),
        kind: record[16],
        direction: record[17],
        family: record[18],
        protocol: record[19],
        local_port: record[20..22].try_into().ok()?,
        remote_port: record[22..24].try_into().ok()?,
        local: record[24..40].try_into().ok()?,
        remote: record[40..56].try_into().ok()?,
    };
    Some(Event {
        time_ns: e.time_ns,
        ifindex: e.ifindex,
        admitted: e.kind == EVENT_ADMITTED,
        rule_id: e.rule_id,
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
        record.extend_from_slice(&0u32.to_ne_bytes());
        record.extend_from_slice(&[EVENT_DENIED, DIR_INGRESS, FAMILY_V4, PROTO_TCP]);
        record.extend_from_slice(&22u16.to_be_bytes());
        record.extend_from_slice(&40000u16.to_be_bytes());
        record.extend_from_slice(&local);
        record.extend_from_slice(&remote);
        assert_eq!(record.len(), std::mem::size_of::<FlowEvent>());
        let e = decode(&record).expect("a whole record");
        assert!(!e.admitted);
        assert_eq!((e.ifindex, e.local_port, e.remote_port), (3, 22, 40000));
        assert_eq!(e.remote, "198.18.0.9".parse::<IpAddr>().unwrap());
        assert_eq!(e.direction, Direction::Ingress);
        assert!(decode(&record[..40]).is_none());
    }
}
