//! The rule compiler: (validated state, local interfaces) → plan, the exact contents of
//! every policy map. Pure: knows nothing of BPF.
//!
//! Shape (DESIGN "Fast path"):
//! - Address stage, per (interface, direction): every peer becomes prefixes (group
//!   references expand to members' private addresses, prefix lists to their CIDRs). The
//!   prefixes are *flattened*: each carries the union of the grants of every prefix that
//!   contains it, so the longest match alone answers (SPEC §1.6a). Identical unions share
//!   one ruleset. Host prefixes (/32, /128) go to the exact-match table, the rest to the
//!   LPM trie.
//! - Port stage, per ruleset: each grant's protocol and ports become LPM prefixes over
//!   {protocol, port}: all protocols = /32, one protocol = /40, port blocks /41–/56, ICMP
//!   type = /48, type and code = /56. Overlaps are flattened in the same way (flags).
//!
//! Ids of rules and rulesets are kept from the previous plan where the content is the
//! same, so a small change in the state is a small diff.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

mod membership;

pub use membership::{membership_change, ChangedAddress, MembershipChange, PlanIndex};

use sg_common::{
    ports::split_range, Grant, IfaceConfig, GRANT_UNTRACKED_TCP, GRANT_UNTRACKED_UDP,
    PORT_KEY_FULL_BITS, PORT_KEY_PROTO_BITS, PORT_KEY_RULESET_BITS, PROTO_TCP, PROTO_UDP,
};

use crate::{
    model::{Direction, Peer, PortMatch, Protocol, Rule, State},
    net::{Cidr, Family},
};

/// A local interface the agent enforces, bound to a network interface of the state.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalInterface {
    pub ifindex: u32,
    pub eni: String,
}

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Enforce interfaces with no groups (drop everything but infrastructure).
    pub default_deny: bool,
}

/// Identity of a rule across state changes: its group, direction, match and occurrence.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct RuleKey {
    pub group: String,
    pub direction: Direction,
    pub protocol: Protocol,
    pub ports: PortMatch,
    pub nth: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleInfo {
    pub key: RuleKey,
    pub group_name: String,
    /// Index of the rule in its group's list for its direction.
    pub index: usize,
    pub description: Option<String>,
}

/// One rule admitting traffic from/to one prefix; `flags` are `GRANT_UNTRACKED_*`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct RuleGrant {
    pub rule_id: u32,
    pub flags: u32,
}

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

/// A set of grants shared by every prefix whose union it is, and its port-stage entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub grants: BTreeSet<RuleGrant>,
    pub ports: BTreeMap<PortPrefix, Grant>,
}

/// Key of the address stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefixKey {
    pub ifindex: u32,
    pub direction: Direction,
    pub cidr: Cidr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfacePlan {
    pub eni: String,
    pub config: IfaceConfig,
}

/// The exact contents of every policy map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub interfaces: BTreeMap<u32, InterfacePlan>,
    pub rules: BTreeMap<u32, RuleInfo>,
    pub rulesets: BTreeMap<u32, Ruleset>,
    pub prefixes: BTreeMap<PrefixKey, u32>,
}

/// What the datapath decides for a packet with no tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanVerdict {
    /// The interface is not enforced.
    NotEnforced,
    Deny,
    Allow(Grant),
}

impl PlanVerdict {
    pub fn allows(&self) -> bool {
        !matches!(self, PlanVerdict::Deny)
    }
}

impl Plan {
    /// Mirrors the kernel's policy lookup exactly: interface present, then the longest
    /// prefix of the remote address, then the longest port-stage prefix.
    pub fn lookup(
        &self,
        ifindex: u32,
        direction: Direction,
        remote: IpAddr,
        protocol: u8,
        port: u16,
    ) -> PlanVerdict {
        if !self.interfaces.contains_key(&ifindex) {
            return PlanVerdict::NotEnforced;
        }
        let bits = Family::of(&remote).bits();
        let ruleset = (0..=bits).rev().find_map(|len| {
            self.prefixes.get(&PrefixKey {
                ifindex,
                direction,
                cidr: Cidr::truncate(remote, len),
            })
        });
        let Some(ruleset) = ruleset.and_then(|id| self.rulesets.get(id)) else {
            return PlanVerdict::Deny;
        };
        let full = PortPrefix {
            protocol,
            port,
            len: PORT_KEY_FULL_BITS,
        };
        (PORT_KEY_RULESET_BITS..=PORT_KEY_FULL_BITS)
            .rev()
            .find_map(|len| ruleset.ports.get(&full.parent(len)))
            .map_or(PlanVerdict::Deny, |g| PlanVerdict::Allow(*g))
    }

    /// Number of map entries the plan programs (address stage, port stage, interfaces).
    pub fn entry_count(&self) -> usize {
        self.prefixes.len()
            + self.rulesets.values().map(|r| r.ports.len()).sum::<usize>()
            + self.interfaces.len()
    }

    /// Applies one map operation to this plan as to the kernel's maps.
    pub fn apply(&mut self, op: &MapOp) {
        match op {
            MapOp::PutInterface { ifindex, plan, .. } => {
                self.interfaces.insert(*ifindex, plan.clone());
            }
            MapOp::DeleteInterface { ifindex } => {
                self.interfaces.remove(ifindex);
            }
            MapOp::PutPort {
                ruleset,
                prefix,
                grant,
            } => {
                self.rulesets
                    .entry(*ruleset)
                    .or_default()
                    .ports
                    .insert(*prefix, *grant);
            }
            MapOp::DeletePort { ruleset, prefix } => {
                if let Some(r) = self.rulesets.get_mut(ruleset) {
                    r.ports.remove(prefix);
                    if r.ports.is_empty() {
                        self.rulesets.remove(ruleset);
                    }
                }
            }
            MapOp::PutPrefix { key, ruleset } => {
                self.prefixes.insert(*key, *ruleset);
            }
            MapOp::DeletePrefix { key } => {
                self.prefixes.remove(key);
            }
        }
    }
}

/// Compiles the state for the given local interfaces. `previous` keeps ids stable.
pub fn compile(
    state: &State,
    locals: &[LocalInterface],
    options: &Options,
    previous: Option<&Plan>,
) -> Plan {
    let empty = Plan::default();
    let previous = previous.unwrap_or(&empty);
    let mut plan = Plan {
        rules: assign_rule_ids(state, previous),
        ..Plan::default()
    };
    let rule_ids: HashMap<(&str, Direction, usize), u32> = plan
        .rules
        .iter()
        .map(|(id, info)| {
            (
                (info.key.group.as_str(), info.key.direction, info.index),
                *id,
            )
        })
        .collect();
    let members = members_by_group(state);
    let mut interner = Interner::new(previous);

    for local in locals {
        let Some(eni) = state.interface(&local.eni) else {
            continue;
        };
        if eni.groups.is_empty() && !options.default_deny {
            continue;
        }
        let groups: Vec<_> = eni.groups.iter().filter_map(|g| state.group(g)).collect();
        for direction in Direction::BOTH {
            let opposite_all = opposite_allows_all(state, &groups, direction.opposite());
            let mut by_family: [HashMap<Cidr, BTreeSet<RuleGrant>>; 2] = Default::default();
            for g in &groups {
                for (index, rule) in g.rules(direction).iter().enumerate() {
                    let rule_id = rule_ids[&(g.id.as_str(), direction, index)];
                    for cidr in expand_peers(state, &members, rule) {
                        let flags = untracked_flags(rule, &cidr, &opposite_all);
                        let fam = (cidr.family() == Family::V6) as usize;
                        by_family[fam]
                            .entry(cidr)
                            .or_default()
                            .insert(RuleGrant { rule_id, flags });
                    }
                }
            }
            for entries in by_family {
                for (cidr, grants) in flatten(entries) {
                    let id = interner.intern(grants, &plan.rules);
                    plan.prefixes.insert(
                        PrefixKey {
                            ifindex: local.ifindex,
                            direction,
                            cidr,
                        },
                        id,
                    );
                }
            }
        }
        plan.interfaces.insert(
            local.ifindex,
            InterfacePlan {
                eni: eni.id.clone(),
                config: IfaceConfig {
                    flags: 0,
                    timeouts: state.timeouts_for(eni),
                    counter_slot: 0,
                },
            },
        );
    }
    plan.rulesets = interner.used;
    assign_counter_slots(&mut plan, previous);
    plan
}

/// Interfaces keep their counter slot across plans; new ones get the smallest free slot.
fn assign_counter_slots(plan: &mut Plan, previous: &Plan) {
    let mut used = BTreeSet::new();
    for (ifindex, p) in plan.interfaces.iter_mut() {
        if let Some(old) = previous.interfaces.get(ifindex) {
            p.config.counter_slot = old.config.counter_slot;
            used.insert(old.config.counter_slot);
        }
    }
    let mut next = 0;
    for (ifindex, p) in plan.interfaces.iter_mut() {
        if previous.interfaces.contains_key(ifindex) {
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        p.config.counter_slot = next;
        used.insert(next);
    }
}

fn assign_rule_ids(state: &State, previous: &Plan) -> BTreeMap<u32, RuleInfo> {
    let known: HashMap<&RuleKey, u32> =
        previous.rules.iter().map(|(id, r)| (&r.key, *id)).collect();
    let mut keys = Vec::new();
    for g in &state.security_groups {
        for direction in Direction::BOTH {
            let mut seen: HashMap<(Protocol, PortMatch), u32> = HashMap::new();
            for (index, rule) in g.rules(direction).iter().enumerate() {
                let nth = seen.entry((rule.protocol, rule.ports)).or_default();
                let key = RuleKey {
                    group: g.id.clone(),
                    direction,
                    protocol: rule.protocol,
                    ports: rule.ports,
                    nth: *nth,
                };
                *nth += 1;
                keys.push((
                    key,
                    RuleInfo {
                        key: RuleKey {
                            group: String::new(),
                            direction,
                            protocol: rule.protocol,
                            ports: rule.ports,
                            nth: 0,
                        },
                        group_name: g.name.clone(),
                        index,
                        description: rule.description.clone(),
                    },
                ));
            }
        }
    }
    let mut rules = BTreeMap::new();
    let mut fresh = IdAllocator::new(previous.rules.keys().copied());
    // Known rules keep their ids; new ones get ids never used by the previous plan.
    let mut pending = Vec::new();
    for (key, mut info) in keys {
        info.key = key;
        match known.get(&info.key) {
            Some(id) => {
                rules.insert(*id, info);
            }
            None => pending.push(info),
        }
    }
    for info in pending {
        rules.insert(fresh.next(), info);
    }
    rules
}

/// Hands out ids ≥ 1 that are not in `taken`.
struct IdAllocator {
    taken: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(taken: impl Iterator<Item = u32>) -> Self {
        IdAllocator {
            taken: taken.collect(),
            next: 1,
        }
    }

    fn next(&mut self) -> u32 {
        while self.taken.contains(&self.next) {
            self.next += 1;
        }
        self.taken.insert(self.next);
        self.next
    }
}

/// Shares identical rulesets, reusing the previous plan's id for the same content.
struct Interner {
    previous: HashMap<BTreeSet<RuleGrant>, u32>,
    ids: HashMap<BTreeSet<RuleGrant>, u32>,
    used: BTreeMap<u32, Ruleset>,
    fresh: IdAllocator,
}

impl Interner {
    fn new(previous: &Plan) -> Self {
        Interner {
            // Rulesets read back from maps without metadata have no grants: never reused.
            previous: previous
                .rulesets
                .iter()
                .filter(|(_, r)| !r.grants.is_empty())
                .map(|(id, r)| (r.grants.clone(), *id))
                .collect(),
            ids: HashMap::new(),
            used: BTreeMap::new(),
            fresh: IdAllocator::new(previous.rulesets.keys().copied()),
        }
    }

    fn intern(&mut self, grants: BTreeSet<RuleGrant>, rules: &BTreeMap<u32, RuleInfo>) -> u32 {
        if let Some(id) = self.ids.get(&grants) {
            return *id;
        }
        let id = match self.previous.get(&grants) {
            Some(id) => *id,
            None => self.fresh.next(),
        };
        let ports = port_entries(&grants, rules);
        self.used.insert(
            id,
            Ruleset {
                grants: grants.clone(),
                ports,
            },
        );
        self.ids.insert(grants, id);
        id
    }
}

/// Private addresses of the members of each group.
fn members_by_group(state: &State) -> HashMap<&str, Vec<IpAddr>> {
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
type AllowsAll = [[bool; 2]; 2];

fn opposite_allows_all(
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
fn untracked_flags(rule: &Rule, cidr: &Cidr, opposite: &AllowsAll) -> u32 {
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
fn flatten(entries: HashMap<Cidr, BTreeSet<RuleGrant>>) -> Vec<(Cidr, BTreeSet<RuleGrant>)> {
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

/// One update of one map, in the order the datapath must apply it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Settings of an enforced interface; `fresh` when it was not enforced before (its
    /// counter slot is zeroed first).
    PutInterface {
        ifindex: u32,
        plan: InterfacePlan,
        fresh: bool,
    },
    DeleteInterface {
        ifindex: u32,
    },
    PutPort {
        ruleset: u32,
        prefix: PortPrefix,
        grant: Grant,
    },
    DeletePort {
        ruleset: u32,
        prefix: PortPrefix,
    },
    PutPrefix {
        key: PrefixKey,
        ruleset: u32,
    },
    DeletePrefix {
        key: PrefixKey,
    },
}

/// The ordered map operations that turn `old` into `new`, such that no intermediate state
/// denies a packet both plans allow or allows a packet both deny:
/// 1. settings of interfaces enforced before and after;
/// 2. port entries of new rulesets (rulesets never change content: new content, new id);
/// 3. address prefixes, longest first, so an address never falls back to a shorter
///    prefix's *new* ruleset before its own longer prefix is in place;
/// 4. newly enforced interfaces, now that their maps are full;
/// 5. interfaces no longer enforced, then stale prefixes, then stale rulesets.
pub fn diff(old: &Plan, new: &Plan) -> Vec<MapOp> {
    let mut ops = Vec::new();
    for (ifindex, plan) in &new.interfaces {
        if old.interfaces.get(ifindex).is_some_and(|o| o != plan) {
            ops.push(MapOp::PutInterface {
                ifindex: *ifindex,
                plan: plan.clone(),
                fresh: false,
            });
        }
    }
    for (id, ruleset) in &new.rulesets {
        let old_ports = old.rulesets.get(id).map(|r| &r.ports);
        for (prefix, grant) in &ruleset.ports {
            if old_ports.and_then(|p| p.get(prefix)) != Some(grant) {
                ops.push(MapOp::PutPort {
                    ruleset: *id,
                    prefix: *prefix,
                    grant: *grant,
                });
            }
        }
    }
    // Both maps are sorted by key: one merge pass finds what to put and what to delete.
    let (mut puts, mut stale): (Vec<(&PrefixKey, u32)>, Vec<PrefixKey>) = (vec![], vec![]);
    let (mut a, mut b) = (
        old.prefixes.iter().peekable(),
        new.prefixes.iter().peekable(),
    );
    loop {
        match (a.peek(), b.peek()) {
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    stale.push(**ka);
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    puts.push((kb, **vb));
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if va != vb {
                        puts.push((kb, **vb));
                    }
                    a.next();
                    b.next();
                }
            },
            (Some((ka, _)), None) => {
                stale.push(**ka);
                a.next();
            }
            (None, Some((kb, vb))) => {
                puts.push((kb, **vb));
                b.next();
            }
            (None, None) => break,
        }
    }
    puts.sort_by_key(|(k, _)| {
        std::cmp::Reverse(k.cidr.len() as u32 + if k.cidr.family() == Family::V4 { 96 } else { 0 })
    });
    ops.extend(
        puts.into_iter()
            .map(|(key, ruleset)| MapOp::PutPrefix { key: *key, ruleset }),
    );
    for (ifindex, plan) in &new.interfaces {
        if !old.interfaces.contains_key(ifindex) {
            ops.push(MapOp::PutInterface {
                ifindex: *ifindex,
                plan: plan.clone(),
                fresh: true,
            });
        }
    }
    for ifindex in old.interfaces.keys() {
        if !new.interfaces.contains_key(ifindex) {
            ops.push(MapOp::DeleteInterface { ifindex: *ifindex });
        }
    }
    ops.extend(stale.into_iter().map(|key| MapOp::DeletePrefix { key }));
    for (id, ruleset) in &old.rulesets {
        let new_ports = new.rulesets.get(id).map(|r| &r.ports);
        for prefix in ruleset.ports.keys() {
            if new_ports.is_none_or(|p| !p.contains_key(prefix)) {
                ops.push(MapOp::DeletePort {
                    ruleset: *id,
                    prefix: *prefix,
                });
            }
        }
    }
    ops
}
