//! The reference evaluator: the naive verdict, walking every rule of every group of the
//! interface. Slow and obviously right; the compiler is tested against it, and `explain`
//! uses it to name the rule that allows a packet.

#![forbid(unsafe_code)]

use std::net::IpAddr;

use sg_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

use crate::{
    model::{Direction, Peer, PortMatch, Protocol, Rule, SecurityGroup, State},
    net::{Cidr, Family},
};

/// A packet as policy sees it, from the interface's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub direction: Direction,
    pub protocol: u8,
    /// Source for ingress, destination for egress.
    pub remote: IpAddr,
    /// Destination port (TCP/UDP), `type << 8 | code` (ICMP), 0 otherwise.
    pub port: u16,
}

impl Packet {
    pub fn icmp(direction: Direction, remote: IpAddr, icmp_type: u8, code: u8) -> Packet {
        let protocol = match remote {
            IpAddr::V4(_) => PROTO_ICMP,
            IpAddr::V6(_) => PROTO_ICMPV6,
        };
        Packet {
            direction,
            protocol,
            remote,
            port: (icmp_type as u16) << 8 | code as u16,
        }
    }
}

/// The rule that allows a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    pub group_id: String,
    pub group_name: String,
    pub rule_index: usize,
    pub rule: Rule,
    pub peer: Peer,
    /// Whether the flow would be untracked (SPEC §1.11), considering every matching rule.
    pub untracked: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The interface is unknown or has no groups (and default-deny is off).
    NotEnforced,
    Deny,
    Allow(Box<Match>),
}

impl Verdict {
    pub fn allows(&self) -> bool {
        !matches!(self, Verdict::Deny)
    }
}

/// Whether `peer` contains `addr` now (group: a private address of a current member).
pub fn peer_contains(state: &State, peer: &Peer, addr: &IpAddr) -> bool {
    match peer {
        Peer::Cidr(c) => c.contains(addr),
        Peer::Group(g) => state
            .network_interfaces
            .iter()
            .filter(|n| n.groups.iter().any(|x| x == g))
            .any(|n| n.addresses().any(|a| a == *addr)),
        Peer::PrefixList(p) => state
            .prefix_list(p)
            .is_some_and(|pl| pl.entries.iter().any(|c| c.contains(addr))),
    }
}

fn peer_has_any(state: &State, peer: &Peer, family: Family) -> bool {
    let any = |c: &Cidr| c.is_any() && c.family() == family;
    match peer {
        Peer::Cidr(c) => any(c),
        Peer::Group(_) => false,
        Peer::PrefixList(p) => state
            .prefix_list(p)
            .is_some_and(|pl| pl.entries.iter().any(any)),
    }
}

/// Walks every rule of the interface's groups in `packet.direction`.
pub fn evaluate(state: &State, eni: &str, packet: &Packet, default_deny: bool) -> Verdict {
    let Some(ni) = state.interface(eni) else {
        return Verdict::NotEnforced;
    };
    if ni.groups.is_empty() && !default_deny {
        return Verdict::NotEnforced;
    }
    let groups: Vec<&SecurityGroup> = ni.groups.iter().filter_map(|g| state.group(g)).collect();
    let family = Family::of(&packet.remote);
    let mut first: Option<Match> = None;
    let mut untracked = false;
    for g in &groups {
        for (index, rule) in g.rules(packet.direction).iter().enumerate() {
            if !rule.matches_traffic(packet.protocol, packet.port) {
                continue;
            }
            for peer in &rule.peers {
                if !peer_contains(state, peer, &packet.remote) {
                    continue;
                }
                if peer_has_any(state, peer, family)
                    && matches!(packet.protocol, PROTO_TCP | PROTO_UDP)
                    && opposite_allows_all(
                        state,
                        &groups,
                        packet.direction.opposite(),
                        packet.protocol,
                        family,
                    )
                {
                    untracked = true;
                }
                first.get_or_insert_with(|| Match {
                    group_id: g.id.clone(),
                    group_name: g.name.clone(),
                    rule_index: index,
                    rule: rule.clone(),
                    peer: peer.clone(),
                    untracked: false,
                });
            }
        }
    }
    match first {
        Some(mut m) => {
            m.untracked = untracked;
            Verdict::Allow(Box::new(m))
        }
        None => Verdict::Deny,
    }
}

fn opposite_allows_all(
    state: &State,
    groups: &[&SecurityGroup],
    direction: Direction,
    protocol: u8,
    family: Family,
) -> bool {
    groups.iter().flat_map(|g| g.rules(direction)).any(|r| {
        (r.protocol == Protocol::All || r.protocol == Protocol::Number(protocol))
            && match r.ports {
                PortMatch::Any => true,
                PortMatch::Ports { from, to } => from == 0 && to == u16::MAX,
                PortMatch::Icmp { .. } => false,
            }
            && r.peers.iter().any(|p| peer_has_any(state, p, family))
    })
}
