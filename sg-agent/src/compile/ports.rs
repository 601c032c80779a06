//! The port stage: a rule's protocol and ports as LPM prefixes over {protocol, port},
//! and a ruleset's flattened entries.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

use sg_common::{
    ports::split_range, Grant, PORT_KEY_FULL_BITS, PORT_KEY_PROTO_BITS, PORT_KEY_RULESET_BITS,
};

use crate::model::{PortMatch, Protocol};

use super::{RuleGrant, RuleInfo};

/// A prefix of the port stage: LPM length 32 (all protocols) to 56 (exact port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortPrefix {
    pub protocol: u8,
    pub port: u16,
    pub len: u32,
}

impl PortPrefix {
    /// This prefix shortened to `len` bits.
    pub fn parent(&self, len: u32) -> PortPrefix {
        let len = len.min(self.len);
        let protocol = if len >= PORT_KEY_PROTO_BITS {
            self.protocol
        } else {
            0
        };
        let port_bits = len.saturating_sub(PORT_KEY_PROTO_BITS);
        let port = if port_bits == 0 {
            0
        } else {
            self.port & (u16::MAX << (16 - port_bits))
        };
        PortPrefix {
            protocol,
            port,
            len,
        }
    }
}

/// The port-stage prefixes of one rule.
pub fn port_prefixes(rule_protocol: Protocol, ports: PortMatch, mut f: impl FnMut(PortPrefix)) {
    let proto = match rule_protocol {
        Protocol::All => {
            return f(PortPrefix {
                protocol: 0,
                port: 0,
                len: PORT_KEY_RULESET_BITS,
            })
        }
        Protocol::Number(p) => p,
    };
    let whole = PortPrefix {
        protocol: proto,
        port: 0,
        len: PORT_KEY_PROTO_BITS,
    };
    match ports {
        PortMatch::Ports { from, to } if rule_protocol.has_ports() => split_range(from, to, |b| {
            f(PortPrefix {
                protocol: proto,
                port: b.base,
                len: PORT_KEY_PROTO_BITS + b.bits as u32,
            })
        }),
        PortMatch::Icmp {
            icmp_type: Some(t),
            code,
        } if rule_protocol.is_icmp() => f(PortPrefix {
            protocol: proto,
            port: (t as u16) << 8 | code.unwrap_or(0) as u16,
            len: if code.is_some() {
                PORT_KEY_FULL_BITS
            } else {
                PORT_KEY_PROTO_BITS + 8
            },
        }),
        _ => f(whole),
    }
}

/// The port-stage entries of a ruleset, flattened: each entry's flags are the union of
/// the flags of every entry containing it; its rule is its own (the most specific).
pub fn port_entries(
    grants: &BTreeSet<RuleGrant>,
    rules: &BTreeMap<u32, RuleInfo>,
) -> BTreeMap<PortPrefix, Grant> {
    let mut raw: BTreeMap<PortPrefix, Grant> = BTreeMap::new();
    for g in grants {
        let Some(rule) = rules.get(&g.rule_id) else {
            continue;
        };
        port_prefixes(rule.key.protocol, rule.key.ports, |p| {
            let e = raw.entry(p).or_insert(Grant {
                rule_id: g.rule_id,
                flags: 0,
            });
            e.rule_id = e.rule_id.min(g.rule_id);
            e.flags |= g.flags;
        });
    }
    let lengths: BTreeSet<u32> = raw.keys().map(|p| p.len).collect();
    let mut out = raw.clone();
    for (prefix, grant) in out.iter_mut() {
        for len in lengths.range(..prefix.len) {
            if let Some(parent) = raw.get(&prefix.parent(*len)) {
                grant.flags |= parent.flags;
            }
        }
    }
    out
}
