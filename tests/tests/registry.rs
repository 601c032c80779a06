//! The map registry is the truth: the loaded object declares exactly the maps of
//! `sg_common::registry`, each with its spec's kind, sizes and capacity.

use sg_agent::datapath::{Datapath, MapSizes};
use sg_common::registry::{self, MapKind};
use sg_tests::privileges::require_root;

/// BPF_F_NO_PREALLOC (include/uapi/linux/bpf.h).
const NO_PREALLOC: u32 = 1;
/// BPF_F_MMAPABLE (include/uapi/linux/bpf.h).
const MMAPABLE: u32 = 1 << 10;

/// The kind of a loaded map and its kernel info.
fn describe(map: &aya::maps::Map) -> Option<(MapKind, aya::maps::MapInfo)> {
    use aya::maps::Map;
    let (kind, data) = match map {
        Map::HashMap(d) => (MapKind::Hash, d),
        Map::LruHashMap(d) => (MapKind::LruHash, d),
        Map::LpmTrie(d) => (MapKind::LpmTrie, d),
        Map::Array(d) => (MapKind::Array, d),
        Map::PerCpuArray(d) => (MapKind::PerCpuArray, d),
        Map::RingBuf(d) => (MapKind::RingBuf, d),
        _ => return None,
    };
    Some((kind, data.info().ok()?))
}

#[test]
fn every_map_of_the_object_matches_its_registry_spec() {
    if !require_root("every_map_of_the_object_matches_its_registry_spec") {
        return;
    }
    let sizes = MapSizes::default();
    let mut dp = Datapath::load(&sizes).unwrap_or_else(|e| panic!("loading: {e}"));
    let mut seen = Vec::new();
    for (name, map) in dp.ebpf().maps() {
        let spec = registry::spec(name)
            .unwrap_or_else(|| panic!("map {name} of the object has no spec in the registry"));
        let (kind, info) =
            describe(map).unwrap_or_else(|| panic!("{name}: a map kind sg does not use"));
        assert_eq!(kind, spec.kind, "{name}: kind");
        assert_eq!(info.key_size(), spec.key_size, "{name}: key size");
        assert_eq!(info.value_size(), spec.value_size, "{name}: value size");
        let entries = sizes.of(spec.sizing).unwrap_or(spec.max_entries);
        assert_eq!(info.max_entries(), entries, "{name}: capacity");
        assert_eq!(
            info.map_flags() & NO_PREALLOC != 0,
            spec.no_prealloc,
            "{name}: BPF_F_NO_PREALLOC"
        );
        assert_eq!(
            info.map_flags() & MMAPABLE != 0,
            spec.mmapable,
            "{name}: BPF_F_MMAPABLE"
        );
        seen.push(name.to_string());
    }
    for spec in &registry::MAPS {
        assert!(
            seen.iter().any(|n| n == spec.name),
            "{} is in the registry but not in the object",
            spec.name
        );
    }
    assert_eq!(seen.len(), registry::MAPS.len(), "{seen:?}");
}

/// What each table costs in kernel memory (SPEC §7; the sizing table of docs/design.md
/// comes from this test's output): every map reports its memory, and the conntrack tables'
/// grows with `--conntrack-size`, the other maps' does not.
#[test]
fn every_map_reports_its_kernel_memory_and_conntrack_scales_with_its_size() {
    if !require_root("every_map_reports_its_kernel_memory_and_conntrack_scales_with_its_size") {
        return;
    }
    let mut by_size = Vec::new();
    for conntrack in [65_536u32, 262_144, 1_048_576] {
        let sizes = MapSizes {
            conntrack,
            ..MapSizes::default()
        };
        let dp = Datapath::load(&sizes).expect("load");
        let memory = dp.memory();
        assert_eq!(memory.len(), registry::MAPS.len(), "{memory:?}");
        // LPM tries allocate per entry (the kernel reports 0 while they are empty); every
        // other map holds its memory from the start.
        let tries = [
            registry::NET4.name,
            registry::NET6.name,
            registry::PORTS.name,
        ];
        assert!(
            memory
                .iter()
                .all(|(name, _, bytes)| *bytes > 0 || tries.contains(name)),
            "{memory:?}"
        );
        let mib = |name: &str| {
            memory
                .iter()
                .find(|m| m.0 == name)
                .map_or(0.0, |m| m.2 as f64)
                / 1048576.0
        };
        let total: f64 = memory.iter().map(|m| m.2 as f64).sum::<f64>() / 1048576.0;
        eprintln!(
            "conntrack {conntrack}: {} {:.1} MiB, {} {:.1} MiB, {} {:.1} MiB, all maps {:.1} MiB",
            registry::CT.name,
            mib(registry::CT.name),
            registry::CT_SLOTS.name,
            mib(registry::CT_SLOTS.name),
            registry::CT_NEW.name,
            mib(registry::CT_NEW.name),
            total
        );
        if conntrack == 262_144 {
            for (name, entries, bytes) in &memory {
                eprintln!(
                    "  {name}: {entries} entries, {:.2} MiB",
                    *bytes as f64 / 1048576.0
                );
            }
        }
        by_size.push((mib(registry::CT.name), mib(registry::ADDR4.name)));
    }
    // Sixteen times the entries: about sixteen times the established table, the same
    // address table.
    let (small, large) = (by_size[0], by_size[2]);
    assert!(large.0 > small.0 * 12.0, "{by_size:?}");
    assert!((large.1 - small.1).abs() < 0.01, "{by_size:?}");
}
