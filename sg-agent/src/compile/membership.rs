//! Incremental compile of a membership change (DESIGN "Incremental change"): interfaces
//! that no local interface is bound to were added, removed or edited, so the only prefixes
//! that can change are the host prefixes of their addresses. Each is recomputed on every
//! enforced interface and direction exactly as `compile` would (own grants and those of
//! every prefix containing it), and the plan is updated in place: the work is bounded by
//! the rules of the enforced interfaces' groups, not by the number of members.

#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use super::{
    address::{opposite_allows_all, untracked_flags},
    port_entries, MapOp, Plan, PrefixKey, RuleGrant, Ruleset,
};
use crate::{
    model::{Direction, NetworkInterface, Peer, State},
    net::Cidr,
};

/// What a membership change needs to know about a plan besides its maps: the ruleset of
/// each set of grants, and how many prefixes use each ruleset.
#[derive(Debug, Default)]
pub struct PlanIndex {
    by_grants: HashMap<BTreeSet<RuleGrant>, u32>,
    users: HashMap<u32, usize>,
}

impl PlanIndex {
    pub fn new(plan: &Plan) -> PlanIndex {
        let mut index = PlanIndex::default();
        for (id, r) in &plan.rulesets {
            // Rulesets read back from maps without metadata have no grants: never reused.
            if !r.grants.is_empty() {
                index.by_grants.insert(r.grants.clone(), *id);
            }
        }
        for id in plan.prefixes.values() {
            *index.users.entry(*id).or_default() += 1;
        }
        index
    }

    /// How many prefixes use each ruleset, by ruleset id.
    pub fn users_sorted(&self) -> Vec<(u32, usize)> {
        let mut users: Vec<_> = self.users.iter().map(|(id, n)| (*id, *n)).collect();
        users.sort();
        users
    }
}

/// What a membership change did to the plan.
#[derive(Debug, Default)]
pub struct MembershipChange {
    /// The map operations, in the order the datapath must apply them.
    pub ops: Vec<MapOp>,
    /// Whether rulesets were created or removed (the saved metadata must follow).
    pub rulesets_changed: bool,
}

/// An address whose group memberships changed.
#[derive(Clone, Debug)]
pub struct ChangedAddress<'a> {
    pub addr: IpAddr,
    /// The groups of every interface that holds the address now, when the caller knows
    /// them; None: found with a pass over the interfaces.
    pub groups: Option<BTreeSet<&'a str>>,
}

/// The interfaces a change really touched, from the run of interfaces it re-parsed
/// (`added`, now in the state) and the run it replaced (`removed`): a re-parsed run can
/// hold neighbours that did not change, and those are left out.
pub fn changed_interfaces<'a>(
    added: &'a [NetworkInterface],
    removed: &'a [NetworkInterface],
) -> Vec<&'a NetworkInterface> {
    added
        .iter()
        .filter(|n| !removed.contains(n))
        .chain(removed.iter().filter(|n| !added.contains(n)))
        .collect()
}

/// The addresses of the `changed` interfaces. An address held only by `added` interfaces
/// (`holders` counts every interface of the new state that holds it) gets their groups;
/// the others are looked up by `membership_change`.
pub fn changed_addresses<'a>(
    changed: &[&NetworkInterface],
    added: &'a [NetworkInterface],
    holders: impl Fn(&IpAddr) -> usize,
) -> Vec<ChangedAddress<'a>> {
    changed
        .iter()
        .flat_map(|n| n.addresses())
        .map(|addr| {
            let held: Vec<&NetworkInterface> = added
                .iter()
                .filter(|n| n.addresses().any(|a| a == addr))
                .collect();
            ChangedAddress {
                addr,
                groups: (holders(&addr) == held.len()).then(|| {
                    held.iter()
                        .flat_map(|n| n.groups.iter().map(String::as_str))
                        .collect()
                }),
            }
        })
        .collect()
}

/// The membership change of a run of interfaces replaced by `added` (now in `state`),
/// `removed` being what they replaced: None when one of those that really changed is
/// local (`is_local`; the whole state must be compiled) or the plan enforces an
/// interface the state does not have. `holders` counts the interfaces of `state` that
/// hold an address. The one step both sources share: a file's spliced interfaces and an
/// etcd watch response's.
pub fn interfaces_change(
    state: &State,
    plan: &mut Plan,
    index: &mut PlanIndex,
    added: &[NetworkInterface],
    removed: &[NetworkInterface],
    holders: impl Fn(&IpAddr) -> usize,
    is_local: impl Fn(&Plan, &NetworkInterface) -> bool,
) -> Option<MembershipChange> {
    let changed = changed_interfaces(added, removed);
    if changed.iter().any(|n| is_local(plan, n)) {
        return None;
    }
    let addresses = changed_addresses(&changed, added, holders);
    membership_change(state, plan, index, &addresses)
}

/// Updates `plan` (and `index`) for new group memberships of the addresses `changed`:
/// `state` is the new state, which differs from the plan's only in interfaces that are
/// not bound to a local interface. None when the plan enforces an interface the state does
/// not have (a full compile is needed).
pub fn membership_change<'a>(
    state: &'a State,
    plan: &mut Plan,
    index: &mut PlanIndex,
    changed: &[ChangedAddress<'a>],
) -> Option<MembershipChange> {
    let mut changed = changed.to_vec();
    changed.sort_by_key(|c| c.addr);
    changed.dedup_by_key(|c| c.addr);
    // The groups of addresses the caller could not tell: one pass over the interfaces.
    let unknown: Vec<IpAddr> = changed
        .iter()
        .filter(|c| c.groups.is_none())
        .map(|c| c.addr)
        .collect();
    if !unknown.is_empty() {
        for eni in &state.network_interfaces {
            for a in eni.addresses() {
                if let Ok(k) = changed.binary_search_by_key(&a, |c| c.addr) {
                    if unknown.contains(&a) {
                        changed[k]
                            .groups
                            .get_or_insert_default()
                            .extend(eni.groups.iter().map(String::as_str));
                    }
                }
            }
        }
    }
    let member_of: Vec<BTreeSet<&str>> = changed
        .iter()
        .map(|c| c.groups.clone().unwrap_or_default())
        .collect();
    let changed: Vec<IpAddr> = changed.iter().map(|c| c.addr).collect();
    let rule_ids: HashMap<(&str, Direction, usize), u32> = plan
        .rules
        .iter()
        .map(|(id, r)| ((r.key.group.as_str(), r.key.direction, r.index), *id))
        .collect();
    let mut puts = Vec::new();
    let mut deletes = Vec::new();
    for (ifindex, iface) in &plan.interfaces {
        let eni = state.interface(&iface.eni)?;
        let groups: Vec<_> = eni.groups.iter().filter_map(|g| state.group(g)).collect();
        for direction in Direction::BOTH {
            let opposite = opposite_allows_all(state, &groups, direction.opposite());
            for (a, groups_of_a) in changed.iter().zip(&member_of) {
                let host = Cidr::host(*a);
                let mut grants = BTreeSet::new();
                let mut present = false;
                let mut grant = |rule_id: u32, flags: u32| {
                    grants.insert(RuleGrant { rule_id, flags });
                };
                for g in &groups {
                    for (i, rule) in g.rules(direction).iter().enumerate() {
                        let rule_id = *rule_ids.get(&(g.id.as_str(), direction, i))?;
                        let mut cidr = |c: &Cidr, present: &mut bool| {
                            if c.contains(a) {
                                grant(rule_id, untracked_flags(rule, c, &opposite));
                                *present |= *c == host;
                            }
                        };
                        for peer in &rule.peers {
                            match peer {
                                Peer::Cidr(c) => cidr(c, &mut present),
                                Peer::Group(id) => {
                                    if groups_of_a.contains(id.as_str()) {
                                        cidr(&host, &mut present);
                                    }
                                }
                                Peer::PrefixList(id) => {
                                    for c in state.prefix_list(id).iter().flat_map(|p| &p.entries) {
                                        cidr(c, &mut present);
                                    }
                                }
                            }
                        }
                    }
                }
                let key = PrefixKey {
                    ifindex: *ifindex,
                    direction,
                    cidr: host,
                };
                let old = plan.prefixes.get(&key).copied();
                if present {
                    puts.push((key, old, grants));
                } else if let Some(old) = old {
                    deletes.push((key, old));
                }
            }
        }
    }
    let mut change = MembershipChange::default();
    let mut prefix_ops = Vec::new();
    let mut released = Vec::new();
    for (key, old, grants) in puts {
        let id = match index.by_grants.get(&grants) {
            Some(id) => *id,
            None => {
                let id = plan.rulesets.keys().next_back().map_or(1, |last| last + 1);
                let ports = port_entries(&grants, &plan.rules);
                change
                    .ops
                    .extend(ports.iter().map(|(prefix, grant)| MapOp::PutPort {
                        ruleset: id,
                        prefix: *prefix,
                        grant: *grant,
                    }));
                index.by_grants.insert(grants.clone(), id);
                plan.rulesets.insert(id, Ruleset { grants, ports });
                change.rulesets_changed = true;
                id
            }
        };
        if old == Some(id) {
            continue;
        }
        *index.users.entry(id).or_default() += 1;
        released.extend(old);
        plan.prefixes.insert(key, id);
        prefix_ops.push(MapOp::PutPrefix { key, ruleset: id });
    }
    change.ops.extend(prefix_ops);
    for (key, old) in deletes {
        plan.prefixes.remove(&key);
        released.push(old);
        change.ops.push(MapOp::DeletePrefix { key });
    }
    for id in released {
        let users = index.users.entry(id).or_default();
        *users = users.saturating_sub(1);
        if *users > 0 {
            continue;
        }
        index.users.remove(&id);
        if let Some(r) = plan.rulesets.remove(&id) {
            index.by_grants.remove(&r.grants);
            change.rulesets_changed = true;
            change
                .ops
                .extend(r.ports.keys().map(|prefix| MapOp::DeletePort {
                    ruleset: id,
                    prefix: *prefix,
                }));
        }
    }
    Some(change)
}
