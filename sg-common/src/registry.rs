//! The registry of sg's maps: one spec per map (name, kind, key and value size, default
//! capacity, which load-time size sets it, who writes it, what it holds). The kernel
//! object declares its maps from these specs, the agent checks pinned maps, applies sizes,
//! pins and detaches by them, and the docs table is rendered from them; a test loads the
//! object and checks every map against its spec.

use core::mem::size_of;

use crate::maps::*;

/// The kind of a BPF map, as the kernel names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash,
    LruHash,
    LpmTrie,
    Array,
    PerCpuArray,
    RingBuf,
}

impl MapKind {
    pub const fn name(self) -> &'static str {
        match self {
            MapKind::Hash => "hash",
            MapKind::LruHash => "lru_hash",
            MapKind::LpmTrie => "lpm_trie",
            MapKind::Array => "array",
            MapKind::PerCpuArray => "percpu_array",
            MapKind::RingBuf => "ringbuf",
        }
    }
}

/// Who writes a map's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// Only the agent (policy, settings); the datapath only reads.
    Agent,
    /// Only the datapath (counters, events); the agent reads, and zeroes or deletes.
    Datapath,
    /// Both: the datapath inserts and updates, the agent garbage-collects.
    Both,
}

impl Writer {
    pub const fn name(self) -> &'static str {
        match self {
            Writer::Agent => "agent",
            Writer::Datapath => "datapath",
            Writer::Both => "datapath (agent GC)",
        }
    }
}

/// Which of the agent's load-time sizes sets a map's capacity (`Fixed`: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sizing {
    Fixed,
    Conntrack,
    ConntrackNew,
    /// Twice the conntrack size, plus one.
    ConntrackSlots,
    /// The presence filter's chunks for both conntrack tables, plus its header.
    ConntrackSeen,
    Addresses,
    Networks,
    Ports,
    Interfaces,
    Rules,
    Fragments,
}

/// One map: everything kernel and user space must agree on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// Object and pin name: `SG_`, at most 15 characters, `_V2` when the layout changes.
    pub name: &'static str,
    pub kind: MapKind,
    /// Key size in bytes as the kernel reports it (LPM tries: 4 + data).
    pub key_size: u32,
    pub value_size: u32,
    /// Default capacity (ring buffer: bytes).
    pub max_entries: u32,
    /// `BPF_F_NO_PREALLOC`: hash maps only the agent writes, and every LPM trie (the
    /// kernel requires it of tries).
    pub no_prealloc: bool,
    /// `BPF_F_MMAPABLE`: an array the agent writes through shared memory, byte by byte
    /// beside the datapath's own writes (a whole-value update would undo them).
    pub mmapable: bool,
    pub sizing: Sizing,
    pub writer: Writer,
    /// One line: what it holds.
    pub holds: &'static str,
}

impl MapSpec {
    /// The map flags the kernel object declares (`BPF_F_NO_PREALLOC`, `BPF_F_MMAPABLE`).
    pub const fn flags(&self) -> u32 {
        const NO_PREALLOC: u32 = 1;
        const MMAPABLE: u32 = 1 << 10;
        (if self.no_prealloc { NO_PREALLOC } else { 0 })
            | (if self.mmapable { MMAPABLE } else { 0 })
    }
}

const fn lpm(data: usize) -> u32 {
    4 + data as u32
}

pub const STATUS: MapSpec = MapSpec {
    name: "SG_STATUS",
    kind: MapKind::Array,
    key_size: 4,
    value_size: size_of::<StatusBlob>() as u32,
    max_entries: 1,
    no_prealloc: false,
    mmapable: false,
    sizing: Sizing::Fixed,
    writer: Writer::Agent,
    holds:
        "the agent's status document (JSON), readable from the pins whether or not the agent runs",
};
pub const CT: MapSpec = MapSpec {
    name: "SG_CT_V2",
    kind: MapKind::Hash,
    key_size: size_of::<CtKey>() as u32,
    value_size: size_of::<CtEntry>() as u32,
    max_entries: 262_144,
    no_prealloc: false,
    mmapable: false,
    sizing: Sizing::Conntrack,
    writer: Writer::Both,
    holds: "established (assured) flows; new flows can never evict these",
};
pub const CT_NEW: MapSpec = MapSpec {
    name: "SG_CT_NEW_V2",
    kind: MapKind::LruHash,
    key_size: size_of::<CtKey>() as u32,
    value_size: size_of::<CtEntry>() as u32,
    max_entries: 65_536,
    no_prealloc: false,
    mmapable: false,
    sizing: Sizing::ConntrackNew,
    writer: Writer::Both,
    holds: "embryonic flows (one direction seen); LRU, so floods only evict each other",
};
pub const CT_SLOTS: MapSpec = MapSpec {
    name: "SG_CT_SLOTS",
    kind: MapKind::Array,
    key_size: 4,
    value_size: size_of::<CtKey>() as u32,
    max_entries: 2 * 262_144 + 1,
    no_prealloc: false,
    mmapable: false,
    sizing: Sizing::ConntrackSlots,
    writer: Writer::Datapath,
    holds: "the established table's index (a key per slot, twice its size, then the sweep \
            cursor): how the datapath finds and removes expired flows itself, with or without the agent",
};
pub const CT_SEEN: MapSpec = MapSpec {
    name: "SG_CT_SEEN",
    kind: MapKind::Array,
    key_size: 4,
    value_size: crate::ct::SEEN_CHUNK,
    max_entries: 1 + crate::ct::seen_slots(CT.max_entries, CT_NEW.max_entries)
        / crate::ct::SEEN_CHUNK,
    no_prealloc: false,
    mmapable: true,
    sizing: Sizing::ConntrackSeen,
    writer: Writer::Both,
    holds: "flow-presence filter over both conntrack tables (a header, then an epoch byte per \
            slot): a packet whose slot is stale has no flow and skips both lookups",
};
pub const ADDR4: MapSpec = MapSpec {
    name: "SG_ADDR4",
    kind: MapKind::Hash,
    key_size: size_of::<Addr4Key>() as u32,
    value_size: size_of::<RulesetRef>() as u32,
    max_entries: 524_288,
    no_prealloc: true,
    mmapable: false,
    sizing: Sizing::Addresses,
    writer: Writer::Agent,
    holds: "exact remote IPv4 addresses (/32: group members, hosts) → ruleset",
};
pub const ADDR6: MapSpec = MapSpec {
    name: "SG_ADDR6",
    kind: MapKind::Hash,
    key_size: size_of::<Addr6Key>() as u32,
    value_size: size_of::<RulesetRef>() as u32,
    max_entries: 524_288,
    no_prealloc: true,
    mmapable: false,
    sizing: Sizing::Addresses,
    writer: Writer::Agent,
    holds: "exact remote IPv6 addresses (/128) → ruleset",
};
pub const NET4: MapSpec = MapSpec {
    name: "SG_NET4",
    kind: MapKind::LpmTrie,
    key_size: lpm(size_of::<Net4Data>()),
    value_size: size_of::<RulesetRef>() as u32,
    max_entries: 131_072,
    no_prealloc: true,
    mmapable: false,
    sizing: Sizing::Networks,
    writer: Writer::Agent,
    holds: "remote IPv4 CIDRs, flattened (each carries the union of its containers) → ruleset",
};
pub const NET6: MapSpec = MapSpec {
    name: "SG_NET6",
    kind: MapKind::LpmTrie,
    key_size: lpm(size_of::<Net6Data>()),
    value_size: size_of::<RulesetRef>() as u32,
    max_entries: 131_072,
    no_prealloc: true,
    mmapable: false,
    sizing: Sizing::Networks,
    writer: Writer::Agent,
    holds: "remote IPv6 CIDRs, flattened → ruleset",
};
pub const PORTS: MapSpec = MapSpec {
    name: "SG_PORTS",
    kind: MapKind::LpmTrie,
    key_size: lpm(size_of::<PortData>()),
    value_size: size_of::<Grant>() as u32,
    max_entries: 262_144,
    no_prealloc: true,
    mmapable: false,
    sizing: Sizing::Ports,
    writer: Writer::Agent,
    holds: "port stage: {ruleset, protocol, port} → admitting rule and flags",
};
pub const IFACE: MapSpec = MapSpec {
    name: "SG_IFACE",
    kind: MapKind::Hash,
    key_size: 4,
    value_size: size_of::<IfaceConfig>() as u32,
    max_entries: 256,
    no_prealloc: false,
    mmapable: false,
    sizing: Sizing::Interfaces,
    writer: Writer::Agent,
    holds: "ifindex → settings of an enforced interface (absent: not enforced)",
};
pub const GLOBAL: MapSpec = MapSpec {
    name: "SG_GLOBAL",
    kind: MapKind::Array,
    key_size: 4,
    value_size: size_of::<GlobalConfig>() as u32,
    max_entries: 1,
    no_prealloc: false,
    mmapable: false,
    sizing: Sizing::Fixed,
    writer: Writer::Agent,
    holds: "global settings: clock offset (tests), denied-event rate, size of the conntrack index",
};
pub const COUNTERS: MapSpec = MapSpec {
    // _V2: bytes beside packets.
    name: "SG_COUNTERS_V2",
    kind: MapKind::PerCpuArray,
    key_size: 4,
    value_size: size_of::<Counters>() as u32,
    max_entries: 256,
    no_prealloc: false,
    mmapable: false,
    sizing: Sizing::Interfaces,
    writer: Writer::Datapath,
    holds: "per-CPU packet and byte counters by interface counter slot (zeroed by the agent on a new slot)",
};
pub const RULE_HITS: MapSpec = MapSpec {
    name: "SG_RULE_HITS",
    kind: MapKind::PerCpuArray,
    key_size: 4,
    value_size: 8,
    max_entries: 131_072,
    no_prealloc: false,
    mmapable: false,
    sizing: Sizing::Rules,
    writer: Writer::Datapath,
    holds: "rule id → per-CPU count of flows admitted",
};
pub const FRAGS: MapSpec = MapSpec {
    // _V2: direction in the key and a timestamp in the value.
    name: "SG_FRAGS_V2",
    kind: MapKind::LruHash,
    key_size: size_of::<FragKey>() as u32,
    value_size: size_of::<FragEntry>() as u32,
    max_entries: 16_384,
    no_prealloc: false,
    mmapable: false,
    sizing: Sizing::Fragments,
    writer: Writer::Datapath,
    holds: "allowed first fragments, by interface, direction, addresses and id, for the reassembly timeout",
};
pub const EVENTS: MapSpec = MapSpec {
    // _V2: 64-byte events with bytes, TCP flags and drop reasons.
    name: "SG_EVENTS_V2",
    kind: MapKind::RingBuf,
    key_size: 0,
    value_size: 0,
    max_entries: 1 << 20,
    no_prealloc: false,
    mmapable: false,
    sizing: Sizing::Fixed,
    writer: Writer::Datapath,
    holds: "flow events (admitted flows, rate-limited denials) for the agent",
};
pub const EVENT_RATE: MapSpec = MapSpec {
    name: "SG_EVENT_RATE",
    kind: MapKind::PerCpuArray,
    key_size: 4,
    value_size: size_of::<EventRate>() as u32,
    max_entries: 1,
    no_prealloc: false,
    mmapable: false,
    sizing: Sizing::Fixed,
    writer: Writer::Datapath,
    holds: "per-CPU token state of the denied-event rate limit",
};

/// Pins of maps earlier builds made and this one replaced (a layout change gives a map a
/// new name): an upgraded agent removes them once it has its own, and so does detach.
pub const RETIRED: [&str; 5] = ["SG_FRAGS", "SG_COUNTERS", "SG_EVENTS", "SG_CT", "SG_CT_NEW"];

/// Every map of the enforcing object, in pinning order.
pub const MAPS: [MapSpec; 17] = [
    STATUS, CT, CT_NEW, CT_SLOTS, CT_SEEN, ADDR4, ADDR6, NET4, NET6, PORTS, IFACE, GLOBAL,
    COUNTERS, RULE_HITS, FRAGS, EVENTS, EVENT_RATE,
];

/// The spec of the map named `name`.
pub fn spec(name: &str) -> Option<&'static MapSpec> {
    MAPS.iter().find(|m| m.name.as_bytes() == name.as_bytes())
}

/// Names and default sizes derived from the specs, for code that wants a constant.
pub mod names {
    use super::*;
    pub const MAP_STATUS: &str = STATUS.name;
    pub const MAP_CT: &str = CT.name;
    pub const MAP_CT_NEW: &str = CT_NEW.name;
    pub const MAP_CT_SLOTS: &str = CT_SLOTS.name;
    pub const MAP_CT_SEEN: &str = CT_SEEN.name;
    pub const MAP_ADDR4: &str = ADDR4.name;
    pub const MAP_ADDR6: &str = ADDR6.name;
    pub const MAP_NET4: &str = NET4.name;
    pub const MAP_NET6: &str = NET6.name;
    pub const MAP_PORTS: &str = PORTS.name;
    pub const MAP_IFACE: &str = IFACE.name;
    pub const MAP_GLOBAL: &str = GLOBAL.name;
    pub const MAP_COUNTERS: &str = COUNTERS.name;
    pub const MAP_RULE_HITS: &str = RULE_HITS.name;
    pub const MAP_FRAGS: &str = FRAGS.name;
    pub const MAP_EVENTS: &str = EVENTS.name;
    pub const MAP_EVENT_RATE: &str = EVENT_RATE.name;

    pub const DEFAULT_CT_ENTRIES: u32 = CT.max_entries;
    pub const DEFAULT_CT_NEW_ENTRIES: u32 = CT_NEW.max_entries;
    pub const DEFAULT_ADDR_ENTRIES: u32 = ADDR4.max_entries;
    pub const DEFAULT_NET_ENTRIES: u32 = NET4.max_entries;
    pub const DEFAULT_PORT_ENTRIES: u32 = PORTS.max_entries;
    pub const DEFAULT_IFACE_ENTRIES: u32 = IFACE.max_entries;
    pub const DEFAULT_RULE_ENTRIES: u32 = RULE_HITS.max_entries;
    pub const DEFAULT_FRAG_ENTRIES: u32 = FRAGS.max_entries;
    pub const EVENTS_BYTES: u32 = EVENTS.max_entries;
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

// Names are unique, start with `SG_` and fit the kernel's 15 characters.
const _: () = {
    let mut i = 0;
    while i < MAPS.len() {
        let n = MAPS[i].name.as_bytes();
        assert!(n.len() <= 15 && n[0] == b'S' && n[1] == b'G' && n[2] == b'_');
        let mut j = i + 1;
        while j < MAPS.len() {
            assert!(!str_eq(MAPS[i].name, MAPS[j].name));
            j += 1;
        }
        i += 1;
    }
};
