//! The datapath: load the eBPF object, write plans into its maps in the order the compiler
//! gives, attach the programs, read tables back. The only module that touches aya.
//!
//! Rooms: this file (loading, sizes, errors), `plan` (map operations ↔ map entries),
//! `attach` (the one attach path), `pins` (link names, pinned layouts, detach), `seen`
//! (the flow-presence filter's stamps and epochs) and `tables` (every reader, written once
//! for loaded and pinned maps).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use aya::{
    maps::{Array, MapData, MapError},
    programs::{links::FdLink, ProgramError, SchedClassifier, Xdp},
    Ebpf, EbpfError, EbpfLoader,
};
use sg_common::{
    registry::{self, MapSpec, Sizing},
    GlobalConfig, StatusBlob, MAP_GLOBAL, MAP_STATUS, PROG_TC_EGRESS, PROG_TC_INGRESS,
    PROG_XDP_INGRESS, STATUS_BYTES,
};

mod attach;
mod pins;
mod plan;
mod seen;
mod tables;

pub use pins::{
    detach, link_name, links_dir, memlock, pinned_link_ifindexes, pinned_max_entries,
    pinned_memory, registry_table, unpin_interface, unpin_link, Detached,
};
pub use tables::{addr_of, direction_of, FlowRow, Tables};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time (an empty
/// stub when the agent was built without it).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sg-ebpf.o"));

/// SHA-256 of the embedded eBPF object (empty when it is the stub).
pub fn object_sha256() -> String {
    use sha2::Digest;
    sha2::Sha256::digest(OBJECT)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("this sg-agent was built without its eBPF object; build it with `cargo xtask build`")]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("attaching to {iface}: {source}")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("link on {iface}: {source}")]
    Link {
        iface: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinned map {path} has another layout ({found}; this agent needs {expected}); run `sg-agent detach` first")]
    Layout {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("pinned map {name} holds {pinned} entries, but {flag} asks for {wanted}; the tracked flows would be lost, so nothing was changed: run with {flag} {pinned} to keep them, or `sg-agent detach` first to start afresh")]
    Size {
        name: &'static str,
        flag: &'static str,
        pinned: u32,
        wanted: u32,
    },
    #[error("{what} {path}: {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// A failed system call on the map `name` (one aya does not make for us).
fn sys_err(name: &'static str, call: &'static str) -> impl FnOnce(std::io::Error) -> DatapathError {
    move |io_error| DatapathError::Map {
        name,
        source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
    }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

/// Map capacities chosen at load time; each sizes the maps whose spec names it.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub conntrack: u32,
    pub conntrack_new: u32,
    pub addresses: u32,
    pub networks: u32,
    pub ports: u32,
    pub interfaces: u32,
    pub rules: u32,
    pub fragments: u32,
}

impl MapSizes {
    /// The capacity of a map of this sizing (None: fixed by its spec).
    pub fn of(&self, sizing: Sizing) -> Option<u32> {
        Some(match sizing {
            Sizing::Fixed => return None,
            Sizing::Conntrack => self.conntrack,
            Sizing::ConntrackNew => self.conntrack_new,
            Sizing::ConntrackSlots => self.conntrack.saturating_mul(2).saturating_add(1),
            Sizing::ConntrackSeen => {
                1 + sg_common::ct::seen_slots(self.conntrack, self.conntrack_new)
                    / sg_common::ct::SEEN_CHUNK
            }
            Sizing::Addresses => self.addresses,
            Sizing::Networks => self.networks,
            Sizing::Ports => self.ports,
            Sizing::Interfaces => self.interfaces,
            Sizing::Rules => self.rules,
            Sizing::Fragments => self.fragments,
        })
    }
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            conntrack: registry::CT.max_entries,
            conntrack_new: registry::CT_NEW.max_entries,
            addresses: registry::ADDR4.max_entries,
            networks: registry::NET4.max_entries,
            ports: registry::PORTS.max_entries,
            interfaces: registry::IFACE.max_entries,
            rules: registry::RULE_HITS.max_entries,
            fragments: registry::FRAGS.max_entries,
        }
    }
}

/// Which program enforces ingress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IngressHook {
    Xdp,
    #[default]
    Tc,
}

/// The loaded programs and maps, and the links this process holds without pinning them.
pub struct Datapath {
    ebpf: Ebpf,
    /// Links attached without a pin directory (tests): they go with the Datapath.
    links: Vec<FdLink>,
    /// The flow-presence filter, mapped.
    seen: Option<seen::Seen>,
}

impl Datapath {
    /// Loads the embedded object with `sizes` and loads (verifies) every program.
    pub fn load(sizes: &MapSizes) -> Result<Datapath> {
        Self::load_with(OBJECT, sizes, None)
    }

    /// Loads the embedded object reusing the maps pinned under `pin_dir` (after checking
    /// their layout), creating and pinning those that are missing.
    pub fn open_pinned(sizes: &MapSizes, pin_dir: &Path) -> Result<Datapath> {
        pins::check_layouts(pin_dir)?;
        pins::check_sizes(pin_dir, sizes)?;
        let mut dp = Self::load_with(OBJECT, sizes, Some(pin_dir))?;
        // The flows of an earlier build's tables move into this one's before those go:
        // an upgrade loses no established connection.
        match dp.carry_over(pin_dir) {
            Ok(0) => {}
            Ok(n) => log::info!("carried {n} flows over from the earlier build's tables"),
            Err(e) => log::warn!("carrying flows over from the earlier build's tables: {e}"),
        }
        pins::remove_retired(pin_dir);
        Ok(dp)
    }

    fn load_with(object: &[u8], sizes: &MapSizes, pin_dir: Option<&Path>) -> Result<Datapath> {
        if object.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&'static str, PathBuf)> = match pin_dir {
            Some(dir) => registry::MAPS
                .iter()
                .map(|m| (m.name, dir.join(m.name)))
                .collect(),
            None => vec![],
        };
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        for spec in &registry::MAPS {
            if let Some(n) = sizes.of(spec.sizing) {
                loader.map_max_entries(spec.name, n);
            }
        }
        let mut ebpf = loader.load(object)?;
        load_programs(&mut ebpf)?;
        let seen = Some(seen::Seen::open(&ebpf)?);
        let mut dp = Datapath {
            ebpf,
            links: Vec::new(),
            seen,
        };
        let adopted =
            pin_dir.is_some_and(|_| dp.global().is_ok_and(|g| g.deny_events_per_sec != 0));
        if !adopted {
            dp.set_global(GlobalConfig {
                clock_offset_ns: 0,
                deny_events_per_sec: 100,
                ct_slots: 0,
            })?;
        }
        // The established table's index, before any program of this build runs: an
        // earlier build left 0 here (its programs never read it).
        let slots = sizes.conntrack.saturating_mul(2);
        let g = dp.global()?;
        if g.ct_slots != slots {
            dp.set_global(GlobalConfig {
                ct_slots: slots,
                ..g
            })?;
        }
        Ok(dp)
    }

    /// Each map of this object with its capacity and the kernel memory it holds.
    pub fn memory(&self) -> Vec<(&'static str, u32, u64)> {
        use aya::maps::Map;
        registry::MAPS
            .iter()
            .filter_map(|spec| {
                let data = match self.ebpf.map(spec.name)? {
                    Map::HashMap(d)
                    | Map::LruHashMap(d)
                    | Map::LpmTrie(d)
                    | Map::Array(d)
                    | Map::PerCpuArray(d)
                    | Map::RingBuf(d) => d,
                    _ => return None,
                };
                let entries = data.info().ok()?.max_entries();
                Some((spec.name, entries, pins::memlock(data)?))
            })
            .collect()
    }

    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The readers, over this object's maps.
    pub fn tables(&self) -> Tables<'_> {
        Tables::Loaded(&self.ebpf)
    }

    pub fn xdp_ingress(&mut self) -> Result<&mut Xdp> {
        program(&mut self.ebpf, PROG_XDP_INGRESS)
    }

    pub fn tc(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        program(&mut self.ebpf, name)
    }

    pub fn set_global(&mut self, g: GlobalConfig) -> Result<()> {
        let mut a: Array<&mut MapData, GlobalConfig> = self.map(&registry::GLOBAL)?;
        a.set(0, g, 0).map_err(map_err(MAP_GLOBAL))
    }

    pub fn global(&self) -> Result<GlobalConfig> {
        self.tables().global()
    }

    fn map<'a, T>(&'a mut self, spec: &'static MapSpec) -> Result<T>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let m = self
            .ebpf
            .map_mut(spec.name)
            .ok_or(DatapathError::MissingMap(spec.name))?;
        T::try_from(m).map_err(map_err(spec.name))
    }

    /// Writes the agent's status document into `SG_STATUS`.
    pub fn write_status(&mut self, json: &str) -> Result<()> {
        let mut blob = Box::new(StatusBlob {
            len: 0,
            data: [0; STATUS_BYTES],
        });
        let bytes = json.as_bytes();
        let n = bytes.len().min(STATUS_BYTES);
        blob.data[..n].copy_from_slice(&bytes[..n]);
        blob.len = n as u32;
        let mut a: Array<&mut MapData, StatusBlob> = self.map(&registry::STATUS)?;
        a.set(0, *blob, 0).map_err(map_err(MAP_STATUS))
    }
}

/// Loads (verifies) the three programs at once, each from a thread of its own: the
/// kernel verifies a program in the thread that loads it, and verification is most of
/// the agent's start (about a second per program at this datapath's size), so on a
/// machine with more than one core the programs are verified side by side.
fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    const PROGRAMS: [&str; 3] = [PROG_XDP_INGRESS, PROG_TC_INGRESS, PROG_TC_EGRESS];
    let mut found: Vec<(&'static str, &mut aya::programs::Program)> = ebpf
        .programs_mut()
        .filter_map(|(name, p)| PROGRAMS.into_iter().find(|w| *w == name).map(|w| (w, p)))
        .collect();
    if let Some(missing) = PROGRAMS
        .into_iter()
        .find(|w| found.iter().all(|(n, _)| n != w))
    {
        return Err(DatapathError::MissingProgram(missing));
    }
    let load = |name: &'static str, p: &mut aya::programs::Program| -> Result<()> {
        match p {
            aya::programs::Program::Xdp(x) => x.load(),
            aya::programs::Program::SchedClassifier(c) => c.load(),
            _ => Err(ProgramError::UnexpectedProgramType),
        }
        .map_err(prog_err(name))
    };
    std::thread::scope(|s| {
        let loaders: Vec<_> = found
            .iter_mut()
            .map(|(name, p)| {
                let name = *name;
                s.spawn(move || load(name, p))
            })
            .collect();
        // Every loader is joined, so no program is left loading when one fails.
        let mut result = Ok(());
        for h in loaders {
            let loaded = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
            result = result.and(loaded);
        }
        result
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?;
    p.try_into().map_err(prog_err(name))
}
