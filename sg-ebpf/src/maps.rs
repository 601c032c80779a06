//! The maps of the sg datapath, declared from the registry in `sg-common`
//! (`sg_common::registry`): name, kind, sizes and flags come from one spec per map. The
//! capacities are defaults that the agent overrides at load time.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use sg_common::{ct::SEEN_CHUNK, registry as spec, *};

/// See `registry::CT.holds`.
#[map]
pub static SG_CT_V2: HashMap<CtKey, CtEntry> =
    HashMap::with_max_entries(spec::CT.max_entries, spec::CT.flags());

/// See `registry::CT_NEW.holds`.
#[map]
pub static SG_CT_NEW_V2: LruHashMap<CtKey, CtEntry> =
    LruHashMap::with_max_entries(spec::CT_NEW.max_entries, spec::CT_NEW.flags());

/// See `registry::CT_SLOTS.holds`.
#[map]
pub static SG_CT_SLOTS: Array<CtKey> =
    Array::with_max_entries(spec::CT_SLOTS.max_entries, spec::CT_SLOTS.flags());

/// See `registry::CT_SEEN.holds`; the layout is `sg_common::ct::SEEN_*`.
#[map]
pub static SG_CT_SEEN: Array<[u8; SEEN_CHUNK as usize]> =
    Array::with_max_entries(spec::CT_SEEN.max_entries, spec::CT_SEEN.flags());

/// See `registry::ADDR4.holds`.
#[map]
pub static SG_ADDR4: HashMap<Addr4Key, RulesetRef> =
    HashMap::with_max_entries(spec::ADDR4.max_entries, spec::ADDR4.flags());

/// See `registry::ADDR6.holds`.
#[map]
pub static SG_ADDR6: HashMap<Addr6Key, RulesetRef> =
    HashMap::with_max_entries(spec::ADDR6.max_entries, spec::ADDR6.flags());

/// See `registry::NET4.holds`.
#[map]
pub static SG_NET4: LpmTrie<Net4Data, RulesetRef> =
    LpmTrie::with_max_entries(spec::NET4.max_entries, spec::NET4.flags());

/// See `registry::NET6.holds`.
#[map]
pub static SG_NET6: LpmTrie<Net6Data, RulesetRef> =
    LpmTrie::with_max_entries(spec::NET6.max_entries, spec::NET6.flags());

/// See `registry::PORTS.holds`.
#[map]
pub static SG_PORTS: LpmTrie<PortData, Grant> =
    LpmTrie::with_max_entries(spec::PORTS.max_entries, spec::PORTS.flags());

/// See `registry::IFACE.holds`.
#[map]
pub static SG_IFACE: HashMap<u32, IfaceConfig> =
    HashMap::with_max_entries(spec::IFACE.max_entries, spec::IFACE.flags());

/// See `registry::GLOBAL.holds`.
#[map]
pub static SG_GLOBAL: Array<GlobalConfig> =
    Array::with_max_entries(spec::GLOBAL.max_entries, spec::GLOBAL.flags());

/// See `registry::COUNTERS.holds`.
#[map]
pub static SG_COUNTERS_V2: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(spec::COUNTERS.max_entries, spec::COUNTERS.flags());

/// See `registry::RULE_HITS.holds`.
#[map]
pub static SG_RULE_HITS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(spec::RULE_HITS.max_entries, spec::RULE_HITS.flags());

/// See `registry::FRAGS.holds`.
#[map]
pub static SG_FRAGS_V2: LruHashMap<FragKey, FragEntry> =
    LruHashMap::with_max_entries(spec::FRAGS.max_entries, spec::FRAGS.flags());

/// See `registry::EVENTS.holds`.
#[map]
pub static SG_EVENTS_V2: RingBuf = RingBuf::with_byte_size(spec::EVENTS.max_entries, 0);

/// See `registry::EVENT_RATE.holds`.
#[map]
pub static SG_EVENT_RATE: PerCpuArray<EventRate> =
    PerCpuArray::with_max_entries(spec::EVENT_RATE.max_entries, spec::EVENT_RATE.flags());

/// See `registry::STATUS.holds`.
#[map]
pub static SG_STATUS: Array<StatusBlob> =
    Array::with_max_entries(spec::STATUS.max_entries, spec::STATUS.flags());
