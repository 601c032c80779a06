//! The maps of the sg datapath. Layouts and names come from `sg-common`; sizes here are
//! defaults that the agent overrides at load time.

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use sg_common::*;

/// Established flows; written on promotion by the datapath, expired entries GC'd by the agent.
#[map]
pub static SG_CT: HashMap<CtKey, CtEntry> = HashMap::with_max_entries(DEFAULT_CT_ENTRIES, 0);

/// Embryonic flows (one direction seen); LRU so floods only evict each other.
#[map]
pub static SG_CT_NEW: LruHashMap<CtKey, CtEntry> =
    LruHashMap::with_max_entries(DEFAULT_CT_NEW_ENTRIES, 0);

/// Exact remote IPv4 addresses → ruleset; written by the agent (only), so not
/// preallocated: kernel memory follows the number of members, not the capacity.
#[map]
pub static SG_ADDR4: HashMap<Addr4Key, RulesetRef> =
    HashMap::with_max_entries(DEFAULT_ADDR_ENTRIES, BPF_F_NO_PREALLOC);

/// Exact remote IPv6 addresses → ruleset; written by the agent only, not preallocated.
#[map]
pub static SG_ADDR6: HashMap<Addr6Key, RulesetRef> =
    HashMap::with_max_entries(DEFAULT_ADDR_ENTRIES, BPF_F_NO_PREALLOC);

/// Flattened remote IPv4 CIDRs → ruleset; written by the agent.
#[map]
pub static SG_NET4: LpmTrie<Net4Data, RulesetRef> =
    LpmTrie::with_max_entries(DEFAULT_NET_ENTRIES, 0);

/// Flattened remote IPv6 CIDRs → ruleset; written by the agent.
#[map]
pub static SG_NET6: LpmTrie<Net6Data, RulesetRef> =
    LpmTrie::with_max_entries(DEFAULT_NET_ENTRIES, 0);

/// {ruleset, protocol, port} → admitting rule; written by the agent.
#[map]
pub static SG_PORTS: LpmTrie<PortData, Grant> = LpmTrie::with_max_entries(DEFAULT_PORT_ENTRIES, 0);

/// ifindex → settings of an enforced interface; written by the agent. Absent: pass.
#[map]
pub static SG_IFACE: HashMap<u32, IfaceConfig> =
    HashMap::with_max_entries(DEFAULT_IFACE_ENTRIES, 0);

/// Global settings, one element; written by the agent.
#[map]
pub static SG_GLOBAL: Array<GlobalConfig> = Array::with_max_entries(1, 0);

/// Counter slot of an interface → per-CPU counters; written by the datapath, zeroed by
/// the agent when it gives a slot to an interface.
#[map]
pub static SG_COUNTERS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DEFAULT_IFACE_ENTRIES, 0);

/// rule id → per-CPU count of flows admitted; written by the datapath.
#[map]
pub static SG_RULE_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DEFAULT_RULE_ENTRIES, 0);

/// First-fragment verdicts; written by the datapath.
#[map]
pub static SG_FRAGS: LruHashMap<FragKey, FragEntry> =
    LruHashMap::with_max_entries(DEFAULT_FRAG_ENTRIES, 0);

/// Flow events for the agent; written by the datapath.
#[map]
pub static SG_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Per-CPU rate limiter of denied-flow events.
#[map]
pub static SG_EVENT_RATE: PerCpuArray<EventRate> = PerCpuArray::with_max_entries(1, 0);

/// Benchmark floor: a plain hash map keyed by IPv4 source address; never used by the
/// enforcing programs.
#[map]
pub static SG_BENCH: HashMap<u32, u32> =
    HashMap::with_max_entries(1 << 18, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// The agent's status document; written by the agent only.
#[map]
pub static SG_STATUS: Array<StatusBlob> = Array::with_max_entries(1, 0);
