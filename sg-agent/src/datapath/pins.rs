//! What lives on the bpffs: map pins (checked against the registry before adoption), link
//! pins named `<ifindex>-<kind>` under `links/`, and detaching all or one interface.

#![forbid(unsafe_code)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapData, MapType},
    programs::links::{FdLink, PinnedLink},
};
use sg_common::{
    link_kind,
    registry::{self, MapKind},
};

use super::{map_err, DatapathError, Result};

/// The link pins' directory under a pin directory.
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// Names of link pins: `<ifindex>-xdp`, `<ifindex>-tcin`, `<ifindex>-tcout`.
pub fn link_name(ifindex: u32, kind: &str) -> String {
    format!("{ifindex}-{kind}")
}

/// The ifindexes that have a link pinned under `links`.
pub fn pinned_link_ifindexes(links: &Path) -> BTreeSet<u32> {
    std::fs::read_dir(links)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.split('-').next()?.parse().ok())
        })
        .collect()
}

pub(super) fn pinned_link(path: &Path) -> Result<Option<FdLink>> {
    if !path.exists() {
        return Ok(None);
    }
    match PinnedLink::from_pin(path) {
        Ok(l) => Ok(Some(FdLink::from(l))),
        Err(e) => Err(DatapathError::Pin {
            what: "opening pinned link",
            path: path.into(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

pub(super) fn pin_link(link: FdLink, path: &Path) -> Result<()> {
    link.pin(path).map(drop).map_err(|e| DatapathError::Pin {
        what: "pinning link",
        path: path.into(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Removes a link pin; the kernel detaches the program when the last reference goes.
pub fn unpin_link(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Pin {
            what: "removing link pin",
            path: path.into(),
            source,
        }),
    }
}

/// Removes the link pins of one interface (all kinds).
pub fn unpin_interface(links: &Path, ifindex: u32) -> Result<()> {
    for kind in link_kind::ALL {
        unpin_link(&links.join(link_name(ifindex, kind)))?;
    }
    Ok(())
}

fn map_type(kind: MapKind) -> MapType {
    match kind {
        MapKind::Hash => MapType::Hash,
        MapKind::LruHash => MapType::LruHash,
        MapKind::LpmTrie => MapType::LpmTrie,
        MapKind::Array => MapType::Array,
        MapKind::PerCpuArray => MapType::PerCpuArray,
        MapKind::RingBuf => MapType::RingBuf,
    }
}

/// The kernel's view of the pinned map of `spec`, if it is pinned.
fn pinned_info(
    pin_dir: &Path,
    spec: &'static registry::MapSpec,
) -> Result<Option<aya::maps::MapInfo>> {
    let path = pin_dir.join(spec.name);
    if !path.exists() {
        return Ok(None);
    }
    MapData::from_pin(&path)
        .and_then(|m| m.info())
        .map(Some)
        .map_err(map_err(spec.name))
}

/// Removes the pins of retired maps (`registry::RETIRED`): the programs that used them
/// keep their own references until they are replaced.
pub(super) fn remove_retired(pin_dir: &Path) {
    for name in registry::RETIRED {
        let p = pin_dir.join(name);
        if p.exists() {
            match std::fs::remove_file(&p) {
                Ok(()) => log::info!("removed {}: an earlier build's map", p.display()),
                Err(e) => log::warn!("removing {}: {e}", p.display()),
            }
        }
    }
}

/// The flows of an earlier build's conntrack table pinned at `path` (entries of the
/// layout before sequence tracking); none when its layout is not that one.
pub fn read_v1_flows(path: &Path) -> Result<Vec<(sg_common::CtKey, sg_common::CtEntryV1)>> {
    let name = "an earlier build's conntrack table";
    let data = MapData::from_pin(path).map_err(map_err(name))?;
    let info = data.info().map_err(map_err(name))?;
    if info.key_size() as usize != size_of::<sg_common::CtKey>()
        || info.value_size() as usize != size_of::<sg_common::CtEntryV1>()
    {
        return Ok(vec![]);
    }
    let map = aya::maps::Map::from_map_data(data).map_err(map_err(name))?;
    let table: aya::maps::HashMap<MapData, sg_common::CtKey, sg_common::CtEntryV1> =
        aya::maps::HashMap::try_from(map).map_err(map_err(name))?;
    Ok(table.iter().filter_map(|r| r.ok()).collect())
}

/// The kernel memory a map holds (`memlock` in its fdinfo), in bytes.
pub fn memlock(map: &MapData) -> Option<u64> {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = map.fd().as_fd().as_raw_fd();
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Each pinned map of the registry with its capacity and the kernel memory it holds
/// (SPEC §7: what the tables cost; docs/design.md shows how to size them).
pub fn pinned_memory(pin_dir: &Path) -> Vec<(&'static str, u32, u64)> {
    registry::MAPS
        .iter()
        .filter_map(|spec| {
            let data = MapData::from_pin(pin_dir.join(spec.name)).ok()?;
            let entries = data.info().ok()?.max_entries();
            Some((spec.name, entries, memlock(&data)?))
        })
        .collect()
}

/// The capacity of a pinned map, in entries.
pub fn pinned_max_entries(pin_dir: &Path, spec: &'static registry::MapSpec) -> Result<u32> {
    pinned_info(pin_dir, spec)?
        .map(|i| i.max_entries())
        .ok_or(DatapathError::MissingMap(spec.name))
}

/// Refuses to adopt pinned maps whose layout differs from the registry's.
pub(super) fn check_layouts(pin_dir: &Path) -> Result<()> {
    for spec in &registry::MAPS {
        let Some(info) = pinned_info(pin_dir, spec)? else {
            continue;
        };
        let path = pin_dir.join(spec.name);
        let found_kind = info.map_type().map_err(map_err(spec.name))?;
        let kind = map_type(spec.kind);
        if found_kind != kind
            || info.key_size() != spec.key_size
            || info.value_size() != spec.value_size
        {
            return Err(DatapathError::Layout {
                path,
                found: format!(
                    "{found_kind:?} key {} value {}",
                    info.key_size(),
                    info.value_size()
                ),
                expected: format!("{kind:?} key {} value {}", spec.key_size, spec.value_size),
            });
        }
    }
    Ok(())
}

impl super::Datapath {
    /// Pins again every map of the loaded object whose pin is gone (someone removed it).
    pub fn repin_missing(&mut self, pin_dir: &Path) -> Result<()> {
        for spec in &registry::MAPS {
            let path = pin_dir.join(spec.name);
            if path.exists() {
                continue;
            }
            let map = self
                .ebpf()
                .map(spec.name)
                .ok_or(DatapathError::MissingMap(spec.name))?;
            map.pin(&path).map_err(|e| DatapathError::Pin {
                what: "pinning map",
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        Ok(())
    }
}

/// Refuses pinned maps whose capacity differs from the one asked for: aya would reuse
/// the pin whatever the size, and silently ignore the flag.
pub(super) fn check_sizes(pin_dir: &Path, sizes: &super::MapSizes) -> Result<()> {
    use sg_common::registry::Sizing;
    for spec in &registry::MAPS {
        let Some(wanted) = sizes.of(spec.sizing) else {
            continue;
        };
        let Some(info) = pinned_info(pin_dir, spec)? else {
            continue;
        };
        if info.max_entries() != wanted {
            return Err(DatapathError::Size {
                name: spec.name,
                flag: match spec.sizing {
                    Sizing::Conntrack | Sizing::ConntrackSlots => "--conntrack-size",
                    Sizing::ConntrackNew => "--conntrack-new-size",
                    Sizing::ConntrackSeen => "--conntrack-size and --conntrack-new-size",
                    _ => "this sg-agent",
                },
                pinned: info.max_entries(),
                wanted,
            });
        }
    }
    Ok(())
}

/// What `detach` removed, and what it could not.
#[derive(Debug, Default)]
pub struct Detached {
    pub removed: usize,
    pub errors: Vec<String>,
}

/// Removes every link and map pin under `pin_dir`, then the directory.
pub fn detach(pin_dir: &Path) -> Detached {
    let mut out = Detached::default();
    let links = links_dir(pin_dir);
    for entry in std::fs::read_dir(&links).into_iter().flatten().flatten() {
        match unpin_link(&entry.path()) {
            Ok(()) => out.removed += 1,
            Err(e) => out.errors.push(e.to_string()),
        }
    }
    let _ = std::fs::remove_dir(&links);
    let names = registry::MAPS
        .iter()
        .map(|m| m.name)
        .chain(registry::RETIRED);
    for name in names {
        let p = pin_dir.join(name);
        if p.exists() {
            match std::fs::remove_file(&p) {
                Ok(()) => out.removed += 1,
                Err(e) => out.errors.push(format!("removing {}: {e}", p.display())),
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(pin_dir) {
        out.errors
            .push(format!("removing {}: {e}", pin_dir.display()));
    }
    out
}

/// The registry as the Markdown table docs/design.md carries (a test keeps them equal).
pub fn registry_table() -> String {
    let mut out = String::from(
        "| map | kind | key | value | default entries | written by | holds |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for m in &registry::MAPS {
        out += &format!(
            "| `{}` | {} | {} | {} | {} | {} | {} |\n",
            m.name,
            m.kind.name(),
            m.key_size,
            m.value_size,
            m.max_entries,
            m.writer.name(),
            m.holds
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_design_doc_carries_the_registry_table() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/design.md"))
                .expect("docs/design.md");
        let table = super::registry_table();
        assert!(
            doc.contains(&table),
            "docs/design.md must carry the registry's table as it is now:\n{table}"
        );
    }
}
