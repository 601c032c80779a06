//! The map registry is the truth: the loaded object declares exactly the maps of
//! `sg_common::registry`, each with its spec's kind, sizes and capacity.

use sg_agent::datapath::{Datapath, MapSizes};
use sg_common::registry::{self, MapKind};
use sg_tests::privileges::require_root;

/// BPF_F_NO_PREALLOC (include/uapi/linux/bpf.h).
const NO_PREALLOC: u32 = 1;

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
