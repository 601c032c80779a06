//! Map operations ↔ map entries: the compiler's `MapOp`s written into the maps in the
//! order given, and the keys of the address stage built (and read back) by one trait for
//! both families.

#![forbid(unsafe_code)]

use aya::maps::{
    lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues,
};
use sg_common::{
    ct,
    registry::{self, MapSpec},
    Addr4Key, Addr6Key, Counters, CtEntry, CtKey, Grant, IfaceConfig, Net4Data, Net6Data, PortData,
    RulesetRef, NET_KEY_FIXED_BITS,
};

use std::os::fd::AsFd;

use super::{map_err, sys_err, tables::direction_of, Datapath, DatapathError, Result};
use crate::{
    compile::{MapOp, PortPrefix, PrefixKey},
    net::{Cidr, Family},
};

/// A key of the address stage: exact addresses (hash) or CIDRs (LPM trie), per family.
pub(super) trait AddressKey: aya::Pod {
    /// The map the key belongs in.
    const SPEC: &'static MapSpec;
    /// The key of `key`'s interface, direction and address (network order).
    fn new(key: &PrefixKey) -> Self;
    /// Back to a prefix key: `len` is the CIDR length of a trie entry (None: a host).
    fn prefix(&self, len: Option<u32>) -> PrefixKey;
}

fn prefix_key(ifindex: u32, direction: u8, addr: std::net::IpAddr, len: Option<u32>) -> PrefixKey {
    let full = if addr.is_ipv4() { 32 } else { 128 };
    PrefixKey {
        ifindex,
        direction: direction_of(direction),
        cidr: Cidr::truncate(addr, len.unwrap_or(full) as u8),
    }
}

/// The four keys differ only in their map, address width and ifindex byte order (the
/// trie's is big-endian, so the bits compare the same on every host).
macro_rules! address_key {
    ($key:ident, $spec:ident, $width:literal, $to_ifindex:expr, $from_ifindex:expr) => {
        impl AddressKey for $key {
            const SPEC: &'static MapSpec = &registry::$spec;
            fn new(key: &PrefixKey) -> Self {
                $key {
                    ifindex: $to_ifindex(key.ifindex),
                    direction: key.direction.code(),
                    _pad: [0; 3],
                    addr: key.cidr.bytes()[..$width]
                        .try_into()
                        .expect("address width"),
                }
            }
            fn prefix(&self, len: Option<u32>) -> PrefixKey {
                prefix_key(
                    $from_ifindex(self.ifindex),
                    self.direction,
                    self.addr.into(),
                    len,
                )
            }
        }
    };
}

address_key!(Addr4Key, ADDR4, 4, u32::from, u32::from);
address_key!(Addr6Key, ADDR6, 16, u32::from, u32::from);
address_key!(Net4Data, NET4, 4, u32::to_be_bytes, u32::from_be_bytes);
address_key!(Net6Data, NET6, 16, u32::to_be_bytes, u32::from_be_bytes);

impl Datapath {
    /// Applies map operations in the order given (the compiler's diff order).
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<()> {
        let mut at = 0;
        while at < ops.len() {
            // A run of host entries of one family: one batch into its exact table (the
            // kernel applies a batch's entries in order, as one call each would).
            match host_run(&ops[at..]) {
                Some((family, run)) if run > 1 => {
                    let batch = &ops[at..at + run];
                    match family {
                        Family::V4 => self.put_exact_batch::<Addr4Key>(batch)?,
                        Family::V6 => self.put_exact_batch::<Addr6Key>(batch)?,
                    }
                    at += run;
                }
                _ => {
                    self.apply_one(&ops[at])?;
                    at += 1;
                }
            }
        }
        Ok(())
    }

    /// Puts the host entries `ops` (all `PutPrefix` of one family) in one batch.
    fn put_exact_batch<K: AddressKey>(&mut self, ops: &[MapOp]) -> Result<()> {
        let (keys, values): (Vec<K>, Vec<RulesetRef>) = ops
            .iter()
            .filter_map(|op| match op {
                MapOp::PutPrefix { key, ruleset } => {
                    Some((K::new(key), RulesetRef { ruleset: *ruleset }))
                }
                _ => None,
            })
            .unzip();
        let map = self
            .ebpf
            .map(K::SPEC.name)
            .ok_or(DatapathError::MissingMap(K::SPEC.name))?;
        let aya::maps::Map::HashMap(data) = map else {
            return Err(DatapathError::MissingMap(K::SPEC.name));
        };
        crate::sys::map_update_batch(data.fd().as_fd(), &keys, &values)
            .map_err(sys_err(K::SPEC.name, "bpf_map_update_batch"))
    }

    fn apply_one(&mut self, op: &MapOp) -> Result<()> {
        match op {
            MapOp::PutInterface {
                ifindex,
                plan,
                fresh,
            } => {
                // A newly enforced interface starts from zero in its counter slot.
                if *fresh {
                    let mut counters: PerCpuArray<&mut MapData, Counters> =
                        self.map(&registry::COUNTERS)?;
                    counters
                        .set(plan.config.counter_slot, per_cpu_zero()?, 0)
                        .map_err(map_err(registry::COUNTERS.name))?;
                }
                let mut m: HashMap<&mut MapData, u32, IfaceConfig> = self.map(&registry::IFACE)?;
                m.insert(ifindex, plan.config, 0)
                    .map_err(map_err(registry::IFACE.name))
            }
            MapOp::DeleteInterface { ifindex } => {
                let mut m: HashMap<&mut MapData, u32, IfaceConfig> = self.map(&registry::IFACE)?;
                ignore_missing(m.remove(ifindex)).map_err(map_err(registry::IFACE.name))
            }
            MapOp::PutPort {
                ruleset,
                prefix,
                grant,
            } => {
                let mut m: LpmTrie<&mut MapData, PortData, Grant> = self.map(&registry::PORTS)?;
                m.insert(&port_key(*ruleset, prefix), grant, 0)
                    .map_err(map_err(registry::PORTS.name))
            }
            MapOp::DeletePort { ruleset, prefix } => {
                let mut m: LpmTrie<&mut MapData, PortData, Grant> = self.map(&registry::PORTS)?;
                ignore_missing(m.remove(&port_key(*ruleset, prefix)))
                    .map_err(map_err(registry::PORTS.name))
            }
            MapOp::PutPrefix { key, ruleset } => self.put_prefix(key, Some(*ruleset)),
            MapOp::DeletePrefix { key } => self.put_prefix(key, None),
        }
    }

    /// Puts (or with None deletes) the ruleset of an address-stage prefix: hosts in the
    /// exact table, the rest in the trie, of the prefix's family.
    fn put_prefix(&mut self, key: &PrefixKey, ruleset: Option<u32>) -> Result<()> {
        let value = ruleset.map(|ruleset| RulesetRef { ruleset });
        match (key.cidr.family(), key.cidr.is_host()) {
            (Family::V4, true) => self.put_exact::<Addr4Key>(key, value),
            (Family::V6, true) => self.put_exact::<Addr6Key>(key, value),
            (Family::V4, false) => self.put_network::<Net4Data>(key, value),
            (Family::V6, false) => self.put_network::<Net6Data>(key, value),
        }
    }

    fn put_exact<K: AddressKey>(
        &mut self,
        key: &PrefixKey,
        value: Option<RulesetRef>,
    ) -> Result<()> {
        let mut m: HashMap<&mut MapData, K, RulesetRef> = self.map(K::SPEC)?;
        let k = K::new(key);
        match value {
            Some(v) => m.insert(k, v, 0),
            None => ignore_missing(m.remove(&k)),
        }
        .map_err(map_err(K::SPEC.name))
    }

    fn put_network<K: AddressKey>(
        &mut self,
        key: &PrefixKey,
        value: Option<RulesetRef>,
    ) -> Result<()> {
        let mut m: LpmTrie<&mut MapData, K, RulesetRef> = self.map(K::SPEC)?;
        let k = Key::new(NET_KEY_FIXED_BITS + key.cidr.len() as u32, K::new(key));
        match value {
            Some(v) => m.insert(&k, v, 0),
            None => ignore_missing(m.remove(&k)),
        }
        .map_err(map_err(K::SPEC.name))
    }
}

/// The family of a host entry's `PutPrefix`, None for any other operation.
fn host_family(op: &MapOp) -> Option<Family> {
    match op {
        MapOp::PutPrefix { key, .. } if key.cidr.is_host() => Some(key.cidr.family()),
        _ => None,
    }
}

/// The family of the first operation when it is a host entry, and how many operations
/// from it are host entries of that family.
fn host_run(ops: &[MapOp]) -> Option<(Family, usize)> {
    let family = host_family(ops.first()?)?;
    let run = ops
        .iter()
        .take_while(|op| host_family(op) == Some(family))
        .count();
    Some((family, run))
}

fn per_cpu_zero<T: aya::Pod + Default + Clone>() -> Result<PerCpuValues<T>> {
    let name = registry::COUNTERS.name;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| sys_err(name, "nr_cpus")(e))?;
    PerCpuValues::try_from(vec![T::default(); cpus]).map_err(sys_err(name, "per_cpu_values"))
}

/// Deleting what is already gone is done.
pub(super) fn ignore_missing(
    r: std::result::Result<(), MapError>,
) -> std::result::Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn port_key(ruleset: u32, prefix: &PortPrefix) -> Key<PortData> {
    Key::new(
        prefix.len,
        PortData {
            ruleset: ruleset.to_be_bytes(),
            protocol: prefix.protocol,
            port: prefix.port.to_be_bytes(),
            _pad: 0,
        },
    )
}

impl Datapath {
    /// Deletes flows from the table each names (established or not); returns how many.
    pub fn delete_flows(&mut self, keys: &[(CtKey, bool)]) -> Result<usize> {
        let mut n = 0;
        for (established, spec) in [(true, &registry::CT), (false, &registry::CT_NEW)] {
            let mut m: HashMap<&mut MapData, CtKey, CtEntry> = self.map(spec)?;
            for (k, e) in keys {
                if *e == established && m.remove(k).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Inserts flows into the table each names, unless a flow of the same key is there;
    /// an established one also gets a slot of the table's index (`SG_CT_SLOTS`), as the
    /// datapath gives its own, so that the datapath can expire it by itself. Returns how
    /// many were inserted.
    pub fn insert_flows(&mut self, flows: &[(CtKey, CtEntry, bool)]) -> Result<usize> {
        let slots = self.global()?.ct_slots;
        let mut taken = std::collections::HashSet::new();
        if slots > 0 {
            let index: Array<&mut MapData, CtKey> = self.map(&registry::CT_SLOTS)?;
            for (i, k) in index.iter().enumerate() {
                if k.is_ok_and(|k| k.ifindex != 0) {
                    taken.insert(i as u32);
                }
            }
        }
        // Before the flows are there, as the datapath does.
        self.seen_stamp(flows.iter().map(|(k, _, _)| *k));
        let mut placed = Vec::new();
        let mut n = 0;
        for (established, spec) in [(true, &registry::CT), (false, &registry::CT_NEW)] {
            let mut m: HashMap<&mut MapData, CtKey, CtEntry> = self.map(spec)?;
            for (k, e, est) in flows {
                if *est != established || m.get(k, 0).is_ok() {
                    continue;
                }
                if m.insert(k, e, 0).is_ok() {
                    n += 1;
                    if established && slots > 0 {
                        let start = ct::ct_slot_of(k, slots);
                        if let Some(slot) = (0..ct::SLOT_PROBES)
                            .map(|i| (start + i) % slots)
                            .find(|s| !taken.contains(s))
                        {
                            taken.insert(slot);
                            placed.push((slot, *k));
                        }
                    }
                }
            }
        }
        let mut index: Array<&mut MapData, CtKey> = self.map(&registry::CT_SLOTS)?;
        for (slot, k) in placed {
            index
                .set(slot, k, 0)
                .map_err(map_err(registry::CT_SLOTS.name))?;
        }
        Ok(n)
    }

    /// Moves the flows of an earlier build's conntrack tables (`SG_CT`, `SG_CT_NEW`,
    /// entries without sequence tracking) pinned under `pin_dir` into this build's, with
    /// nothing known of their sequence numbers (learnt from their next packets). The
    /// earlier build's programs run until this build's replace them, so a flow they open
    /// in between is not carried over: it is judged by the rules again, as after a
    /// restart of netfilter. Returns how many flows were carried over.
    pub fn carry_over(&mut self, pin_dir: &std::path::Path) -> Result<usize> {
        let mut flows = Vec::new();
        for (name, established) in [("SG_CT", true), ("SG_CT_NEW", false)] {
            let path = pin_dir.join(name);
            if !path.exists() {
                continue;
            }
            flows.extend(
                super::pins::read_v1_flows(&path)?
                    .into_iter()
                    .map(|(k, e)| (k, e.upgrade(), established)),
            );
        }
        if flows.is_empty() {
            return Ok(0);
        }
        self.insert_flows(&flows)
    }

    /// Removes every flow from both conntrack tables.
    pub fn flush_flows(&mut self) -> Result<()> {
        let keys: Vec<(CtKey, bool)> = self
            .tables()
            .flows()?
            .into_iter()
            .map(|(k, _, established)| (k, established))
            .collect();
        self.delete_flows(&keys).map(drop)
    }
}
