//! The address stage: peers become prefixes (group references expand to members' private
//! addresses, prefix lists to their CIDRs), flattened so the longest match alone answers.

#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use sg_common::{GRANT_UNTRACKED_TCP, GRANT_UNTRACKED_UDP, PROTO_TCP, PROTO_UDP};

use crate::{
    model::{Direction, Peer, Protocol, Rule, State},
    net::{Cidr, Family},
};

use super::RuleGrant;

/// Private addresses of the members of each group.
pub(super) fn members_by_group(state: &State) -> HashMap<&str, Vec<IpAddr>> {
    let mut members: HashMap<&str, Vec<IpAddr>> = HashMap::new();
    for eni in &state.network_interfaces {
        for g in &eni.groups {
            members
                .entry(g.as_str())
                .or_default()
                .extend(eni.addresses());
        }
    }
    members
}

/// Every prefix a rule's peers stand for, now. An empty group stands for nothing.
pub fn expand_peers<'a>(
    state: &'a State,
    members: &'a HashMap<&str, Vec<IpAddr>>,
    rule: &'a Rule,
) -> impl Iterator<Item = Cidr> + 'a {
    rule.peers
        .iter()
        .flat_map(move |peer| -> Box<dyn Iterator<Item = Cidr> + 'a> {
            match peer {
                Peer::Cidr(c) => Box::new(std::iter::once(*c)),
                Peer::Group(g) => Box::new(
                    members
                        .get(g.as_str())
                        .into_iter()
                        .flatten()
                        .map(|a| Cidr::host(*a)),
                ),
                Peer::PrefixList(p) => Box::new(
                    state
                        .prefix_list(p)
                        .into_iter()
                        .flat_map(|pl| pl.entries.iter().copied()),
                ),
            }
        })
}

/// Per family (v4, v6) and protocol (tcp, udp): whether `direction` has a rule allowing all
/// traffic of the protocol on every port from/to 0.0.0.0/0 or ::/0.
pub(super) type AllowsAll = [[bool; 2]; 2];

pub(super) fn opposite_allows_all(
    state: &State,
    groups: &[&crate::model::SecurityGroup],
    direction: Direction,
) -> AllowsAll {
    let mut all = [[false; 2]; 2];
    for g in groups {
        for rule in g.rules(direction) {
            if !rule.ports.is_all_ports() {
                continue;
            }
            for (p, proto) in [PROTO_TCP, PROTO_UDP].into_iter().enumerate() {
                if !matches!(rule.protocol, Protocol::All)
                    && rule.protocol != Protocol::Number(proto)
                {
                    continue;
                }
                for cidr in expand_peers(state, &HashMap::new(), rule) {
                    if cidr.is_any() {
                        all[(cidr.family() == Family::V6) as usize][p] = true;
                    }
                }
            }
        }
    }
    all
}

/// SPEC §1.11: a TCP or UDP flow admitted by a rule whose peer is 0.0.0.0/0 or ::/0, while
/// the opposite direction allows all of that protocol from/to anywhere, is not tracked.
pub(super) fn untracked_flags(rule: &Rule, cidr: &Cidr, opposite: &AllowsAll) -> u32 {
    if !cidr.is_any() {
        return 0;
    }
    let fam = (cidr.family() == Family::V6) as usize;
    let mut flags = 0;
    for (p, (proto, flag)) in [
        (PROTO_TCP, GRANT_UNTRACKED_TCP),
        (PROTO_UDP, GRANT_UNTRACKED_UDP),
    ]
    .into_iter()
    .enumerate()
    {
        let admits =
            matches!(rule.protocol, Protocol::All) || rule.protocol == Protocol::Number(proto);
        if admits && opposite[fam][p] {
            flags |= flag;
        }
    }
    flags
}

/// Gives every prefix the union of its own grants and those of every prefix containing
/// it, so that the longest match alone is the answer. Host prefixes (group members, the
/// bulk of a large state) contain nothing, so only the others are kept as parents.
pub(super) fn flatten(
    entries: HashMap<Cidr, BTreeSet<RuleGrant>>,
) -> Vec<(Cidr, BTreeSet<RuleGrant>)> {
    let lengths: BTreeSet<u8> = entries
        .keys()
        .filter(|c| !c.is_host())
        .map(|c| c.len())
        .collect();
    let mut order: Vec<(Cidr, BTreeSet<RuleGrant>)> = entries.into_iter().collect();
    order.sort_by_key(|(c, _)| c.len());
    let mut parents: HashMap<Cidr, BTreeSet<RuleGrant>> = HashMap::new();
    let mut out = Vec::with_capacity(order.len());
    for (cidr, mut grants) in order {
        // The nearest present ancestor already holds the union of all of its own.
        if let Some(parent) = lengths
            .range(..cidr.len())
            .rev()
            .find_map(|len| parents.get(&cidr.parent(*len)))
        {
            grants.extend(parent.iter().copied());
        }
        if !cidr.is_host() {
            parents.insert(cidr, grants.clone());
        }
        out.push((cidr, grants));
    }
    out
}
