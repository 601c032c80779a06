//! Every reader of the maps, written once and generic over where the maps come from: the
//! object this process loaded, or the pins of an agent that runs (or ran) elsewhere.

#![forbid(unsafe_code)]

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray},
    Ebpf,
};
use sg_common::{
    registry::{self, MapSpec},
    Addr4Key, Addr6Key, Counters, CtEntry, CtKey, GlobalConfig, Grant, IfaceConfig, Net4Data,
    Net6Data, PortData, RulesetRef, StatusBlob, DIR_INGRESS, FAMILY_V4, NET_KEY_FIXED_BITS,
    STATUS_BYTES,
};

use super::{map_err, plan::AddressKey, DatapathError, Result};
use crate::{
    compile::{InterfacePlan, Plan, PortPrefix},
    model::Direction,
};

/// Where a reader finds the maps.
#[derive(Clone, Copy)]
pub enum Tables<'a> {
    /// The object this process loaded.
    Loaded(&'a Ebpf),
    /// The pins under a directory; an absent pin reads as an empty map.
    Pinned(&'a Path),
}

/// One tracked flow: its key, its entry, and whether it is in the established table.
pub type FlowRow = (CtKey, CtEntry, bool);

impl Tables<'_> {
    /// Runs `read` on the map of `spec`; None when a pinned map is absent.
    fn with<R>(
        &self,
        spec: &'static MapSpec,
        read: impl FnOnce(&Map) -> Result<R>,
    ) -> Result<Option<R>> {
        match self {
            Tables::Loaded(ebpf) => {
                let map = ebpf
                    .map(spec.name)
                    .ok_or(DatapathError::MissingMap(spec.name))?;
                read(map).map(Some)
            }
            Tables::Pinned(dir) => {
                let path = dir.join(spec.name);
                if !path.exists() {
                    return Ok(None);
                }
                let data = MapData::from_pin(&path).map_err(map_err(spec.name))?;
                let map = Map::from_map_data(data).map_err(map_err(spec.name))?;
                read(&map).map(Some)
            }
        }
    }

    /// Every entry of a hash map (plain or LRU).
    fn hash_entries<K: aya::Pod, V: aya::Pod>(
        &self,
        spec: &'static MapSpec,
    ) -> Result<Vec<(K, V)>> {
        Ok(self
            .with(spec, |map| {
                let m: HashMap<&MapData, K, V> =
                    HashMap::try_from(map).map_err(map_err(spec.name))?;
                m.iter()
                    .map(|item| item.map_err(map_err(spec.name)))
                    .collect()
            })?
            .unwrap_or_default())
    }

    /// Every entry of an LPM trie, with its prefix length.
    fn trie_entries<K: aya::Pod, V: aya::Pod>(
        &self,
        spec: &'static MapSpec,
    ) -> Result<Vec<(u32, K, V)>> {
        Ok(self
            .with(spec, |map| {
                let m: LpmTrie<&MapData, K, V> =
                    LpmTrie::try_from(map).map_err(map_err(spec.name))?;
                m.iter()
                    .map(|item| {
                        item.map(|(k, v)| (k.prefix_len(), k.data(), v))
                            .map_err(map_err(spec.name))
                    })
                    .collect()
            })?
            .unwrap_or_default())
    }

    pub fn global(&self) -> Result<GlobalConfig> {
        Ok(self
            .with(&registry::GLOBAL, |map| {
                let a: Array<&MapData, GlobalConfig> =
                    Array::try_from(map).map_err(map_err(registry::GLOBAL.name))?;
                a.get(&0, 0).map_err(map_err(registry::GLOBAL.name))
            })?
            .unwrap_or_default())
    }

    /// The status document the agent last wrote.
    pub fn status_document(&self) -> Result<Option<String>> {
        Ok(self
            .with(&registry::STATUS, |map| {
                let a: Array<&MapData, StatusBlob> =
                    Array::try_from(map).map_err(map_err(registry::STATUS.name))?;
                let blob = a.get(&0, 0).map_err(map_err(registry::STATUS.name))?;
                let n = (blob.len as usize).min(STATUS_BYTES);
                Ok((n > 0).then(|| String::from_utf8_lossy(&blob.data[..n]).into_owned()))
            })?
            .flatten())
    }

    /// Every enforced interface: its settings and its counters summed over CPUs.
    pub fn interfaces(&self) -> Result<BTreeMap<u32, (IfaceConfig, Counters)>> {
        let configs: Vec<(u32, IfaceConfig)> = self.hash_entries(&registry::IFACE)?;
        let mut out = BTreeMap::new();
        for (ifindex, config) in configs {
            out.insert(ifindex, (config, self.counter_slot(config.counter_slot)?));
        }
        Ok(out)
    }

    /// The counters of one interface (zero when it is not enforced).
    pub fn counters(&self, ifindex: u32) -> Result<Counters> {
        Ok(self
            .interfaces()?
            .remove(&ifindex)
            .map(|(_, c)| c)
            .unwrap_or_default())
    }

    fn counter_slot(&self, slot: u32) -> Result<Counters> {
        Ok(self
            .with(&registry::COUNTERS, |map| {
                let m: PerCpuArray<&MapData, Counters> =
                    PerCpuArray::try_from(map).map_err(map_err(registry::COUNTERS.name))?;
                let mut sum = Counters::default();
                if let Ok(values) = m.get(&slot, 0) {
                    for cpu in values.iter() {
                        for (s, v) in sum.v.iter_mut().zip(cpu.v.iter()) {
                            *s += v;
                        }
                        for (s, b) in sum.bytes.iter_mut().zip(cpu.bytes.iter()) {
                            *s += b;
                        }
                    }
                }
                Ok(sum)
            })?
            .unwrap_or_default())
    }

    /// Flows admitted per rule id, summed over CPUs (ids with no hit are left out).
    pub fn rule_hits(&self) -> Result<BTreeMap<u32, u64>> {
        Ok(self
            .with(&registry::RULE_HITS, |map| {
                let m: PerCpuArray<&MapData, u64> =
                    PerCpuArray::try_from(map).map_err(map_err(registry::RULE_HITS.name))?;
                let mut out = BTreeMap::new();
                for id in 0..m.len() {
                    if let Ok(values) = m.get(&id, 0) {
                        let n: u64 = values.iter().sum();
                        if n > 0 {
                            out.insert(id, n);
                        }
                    }
                }
                Ok(out)
            })?
            .unwrap_or_default())
    }

    /// Every tracked flow, established table first.
    pub fn flows(&self) -> Result<Vec<FlowRow>> {
        let mut out = Vec::new();
        for (spec, established) in [(&registry::CT, true), (&registry::CT_NEW, false)] {
            let rows: Vec<(CtKey, CtEntry)> = self.hash_entries(spec)?;
            out.extend(rows.into_iter().map(|(k, e)| (k, e, established)));
        }
        Ok(out)
    }

    /// The keys of every flow of both tables (no values: one call per flow).
    pub fn flow_keys(&self) -> Result<Vec<CtKey>> {
        let mut out = Vec::new();
        for spec in [&registry::CT, &registry::CT_NEW] {
            let keys = self.with(spec, |map| {
                let m: HashMap<&MapData, CtKey, CtEntry> =
                    HashMap::try_from(map).map_err(map_err(spec.name))?;
                m.keys()
                    .map(|k| k.map_err(map_err(spec.name)))
                    .collect::<Result<Vec<_>>>()
            })?;
            out.extend(keys.unwrap_or_default());
        }
        Ok(out)
    }

    /// What the policy maps hold, as a plan without rule metadata.
    pub fn read_back(&self) -> Result<Plan> {
        let mut plan = Plan::default();
        for (ifindex, config) in self.hash_entries::<u32, IfaceConfig>(&registry::IFACE)? {
            plan.interfaces.insert(
                ifindex,
                InterfacePlan {
                    eni: String::new(),
                    config,
                },
            );
        }
        self.read_exact::<Addr4Key>(&mut plan)?;
        self.read_exact::<Addr6Key>(&mut plan)?;
        self.read_networks::<Net4Data>(&mut plan)?;
        self.read_networks::<Net6Data>(&mut plan)?;
        for (len, d, grant) in self.trie_entries::<PortData, Grant>(&registry::PORTS)? {
            let prefix = PortPrefix {
                protocol: d.protocol,
                port: u16::from_be_bytes(d.port),
                len,
            };
            plan.rulesets
                .entry(u32::from_be_bytes(d.ruleset))
                .or_default()
                .ports
                .insert(prefix, grant);
        }
        Ok(plan)
    }

    fn read_exact<K: AddressKey>(&self, plan: &mut Plan) -> Result<()> {
        for (k, v) in self.hash_entries::<K, RulesetRef>(K::SPEC)? {
            plan.prefixes.insert(k.prefix(None), v.ruleset);
        }
        Ok(())
    }

    fn read_networks<K: AddressKey>(&self, plan: &mut Plan) -> Result<()> {
        for (len, k, v) in self.trie_entries::<K, RulesetRef>(K::SPEC)? {
            plan.prefixes
                .insert(k.prefix(Some(len - NET_KEY_FIXED_BITS)), v.ruleset);
        }
        Ok(())
    }
}

/// An address of a map key, in user terms.
pub fn addr_of(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(*bytes)
    }
}

/// A direction code of a map key, in user terms.
pub fn direction_of(code: u8) -> Direction {
    if code == DIR_INGRESS {
        Direction::Ingress
    } else {
        Direction::Egress
    }
}
