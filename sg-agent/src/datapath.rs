//! The datapath: load the eBPF object, write plans into its maps in the order the compiler
//! gives, attach the programs, read counters and flows back. The only module that touches
//! aya.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, MapType, PerCpuArray,
        PerCpuValues,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
        ProgramError, SchedClassifier, TcAttachType, Xdp,
    },
    util::nr_cpus,
    Ebpf, EbpfError, EbpfLoader,
};
use sg_common::*;

use crate::{
    compile::{diff, InterfacePlan, MapOp, Plan, PortPrefix, PrefixKey},
    model::Direction,
    net::{Cidr, Family},
};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time (an empty
/// stub when the agent was built without it).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sg-ebpf.o"));

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
    #[error("{what} {path}: {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// Map capacities chosen at load time.
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

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            conntrack: DEFAULT_CT_ENTRIES,
            conntrack_new: DEFAULT_CT_NEW_ENTRIES,
            addresses: DEFAULT_ADDR_ENTRIES,
            networks: DEFAULT_NET_ENTRIES,
            ports: DEFAULT_PORT_ENTRIES,
            interfaces: DEFAULT_IFACE_ENTRIES,
            rules: DEFAULT_RULE_ENTRIES,
            fragments: DEFAULT_FRAG_ENTRIES,
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

pub struct Datapath {
    ebpf: Ebpf,
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

impl Datapath {
    /// Loads the embedded object with `sizes` and loads (verifies) every program.
    pub fn load(sizes: &MapSizes) -> Result<Datapath> {
        Self::load_object(OBJECT, sizes)
    }

    pub fn load_object(object: &[u8], sizes: &MapSizes) -> Result<Datapath> {
        Self::load_with(object, sizes, None)
    }

    /// Loads the embedded object reusing the maps pinned under `pin_dir` (after checking
    /// their layout), creating and pinning those that are missing.
    pub fn open_pinned(sizes: &MapSizes, pin_dir: &Path) -> Result<Datapath> {
        check_pinned_layouts(pin_dir)?;
        Self::load_with(OBJECT, sizes, Some(pin_dir))
    }

    fn load_with(object: &[u8], sizes: &MapSizes, pin_dir: Option<&Path>) -> Result<Datapath> {
        if object.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&'static str, PathBuf)> = match pin_dir {
            Some(dir) => ALL_MAPS.iter().map(|m| (*m, dir.join(m))).collect(),
            None => vec![],
        };
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(MAP_CT, sizes.conntrack)
            .map_max_entries(MAP_CT_NEW, sizes.conntrack_new)
            .map_max_entries(MAP_ADDR4, sizes.addresses)
            .map_max_entries(MAP_ADDR6, sizes.addresses)
            .map_max_entries(MAP_NET4, sizes.networks)
            .map_max_entries(MAP_NET6, sizes.networks)
            .map_max_entries(MAP_PORTS, sizes.ports)
            .map_max_entries(MAP_IFACE, sizes.interfaces)
            .map_max_entries(MAP_COUNTERS, sizes.interfaces)
            .map_max_entries(MAP_RULE_HITS, sizes.rules)
            .map_max_entries(MAP_FRAGS, sizes.fragments);
        let mut ebpf = loader.load(object)?;
        for name in [
            PROG_XDP_INGRESS,
            PROG_BENCH_EMPTY,
            PROG_BENCH_HASH,
            PROG_GEN,
        ] {
            let xdp: &mut Xdp = program(&mut ebpf, name)?;
            xdp.load().map_err(prog_err(name))?;
        }
        for name in [PROG_TC_INGRESS, PROG_TC_EGRESS] {
            let p: &mut SchedClassifier = program(&mut ebpf, name)?;
            p.load().map_err(prog_err(name))?;
        }
        let mut dp = Datapath { ebpf };
        let adopted =
            pin_dir.is_some_and(|_| dp.global().is_ok_and(|g| g.deny_events_per_sec != 0));
        if !adopted {
            dp.set_global(GlobalConfig {
                clock_offset_ns: 0,
                deny_events_per_sec: 100,
                flags: 0,
            })?;
        }
        Ok(dp)
    }

    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn xdp_ingress(&mut self) -> Result<&mut Xdp> {
        program(&mut self.ebpf, PROG_XDP_INGRESS)
    }

    pub fn xdp(&mut self, name: &'static str) -> Result<&mut Xdp> {
        program(&mut self.ebpf, name)
    }

    pub fn tc(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        program(&mut self.ebpf, name)
    }

    pub fn set_global(&mut self, g: GlobalConfig) -> Result<()> {
        let mut a: Array<&mut MapData, GlobalConfig> = self.map(MAP_GLOBAL)?;
        a.set(0, g, 0).map_err(map_err(MAP_GLOBAL))
    }

    pub fn global(&mut self) -> Result<GlobalConfig> {
        let a: Array<&mut MapData, GlobalConfig> = self.map(MAP_GLOBAL)?;
        a.get(&0, 0).map_err(map_err(MAP_GLOBAL))
    }

    fn map<'a, T>(&'a mut self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let m = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        T::try_from(m).map_err(map_err(name))
    }

    /// Programs a whole plan into empty maps.
    pub fn write_plan(&mut self, plan: &Plan) -> Result<()> {
        self.apply(&diff(&Plan::default(), plan))
    }

    /// Applies map operations in the order given (the compiler's diff order).
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<()> {
        for op in ops {
            self.apply_one(op)?;
        }
        Ok(())
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
                        self.map(MAP_COUNTERS)?;
                    counters
                        .set(plan.config.counter_slot, per_cpu_zero()?, 0)
                        .map_err(map_err(MAP_COUNTERS))?;
                }
                let mut m: HashMap<&mut MapData, u32, IfaceConfig> = self.map(MAP_IFACE)?;
                m.insert(ifindex, plan.config, 0)
                    .map_err(map_err(MAP_IFACE))
            }
            MapOp::DeleteInterface { ifindex } => {
                let mut m: HashMap<&mut MapData, u32, IfaceConfig> = self.map(MAP_IFACE)?;
                ignore_missing(m.remove(ifindex)).map_err(map_err(MAP_IFACE))
            }
            MapOp::PutPort {
                ruleset,
                prefix,
                grant,
            } => {
                let mut m: LpmTrie<&mut MapData, PortData, Grant> = self.map(MAP_PORTS)?;
                m.insert(&port_key(*ruleset, prefix), grant, 0)
                    .map_err(map_err(MAP_PORTS))
            }
            MapOp::DeletePort { ruleset, prefix } => {
                let mut m: LpmTrie<&mut MapData, PortData, Grant> = self.map(MAP_PORTS)?;
                ignore_missing(m.remove(&port_key(*ruleset, prefix))).map_err(map_err(MAP_PORTS))
            }
            MapOp::PutPrefix { key, ruleset } => self.put_prefix(key, Some(*ruleset)),
            MapOp::DeletePrefix { key } => self.put_prefix(key, None),
        }
    }

    fn put_prefix(&mut self, key: &PrefixKey, ruleset: Option<u32>) -> Result<()> {
        let value = ruleset.map(|ruleset| RulesetRef { ruleset });
        let dir = key.direction.code();
        let addr = key.cidr.bytes();
        match (key.cidr.family(), key.cidr.is_host()) {
            (Family::V4, true) => {
                let mut m: HashMap<&mut MapData, Addr4Key, RulesetRef> = self.map(MAP_ADDR4)?;
                let k = Addr4Key {
                    ifindex: key.ifindex,
                    direction: dir,
                    _pad: [0; 3],
                    addr: addr[..4].try_into().expect("4 bytes"),
                };
                match value {
                    Some(v) => m.insert(k, v, 0),
                    None => ignore_missing(m.remove(&k)),
                }
                .map_err(map_err(MAP_ADDR4))
            }
            (Family::V6, true) => {
                let mut m: HashMap<&mut MapData, Addr6Key, RulesetRef> = self.map(MAP_ADDR6)?;
                let k = Addr6Key {
                    ifindex: key.ifindex,
                    direction: dir,
                    _pad: [0; 3],
                    addr,
                };
                match value {
                    Some(v) => m.insert(k, v, 0),
                    None => ignore_missing(m.remove(&k)),
                }
                .map_err(map_err(MAP_ADDR6))
            }
            (Family::V4, false) => {
                let mut m: LpmTrie<&mut MapData, Net4Data, RulesetRef> = self.map(MAP_NET4)?;
                let k = Key::new(
                    NET_KEY_FIXED_BITS + key.cidr.len() as u32,
                    Net4Data {
                        ifindex: key.ifindex.to_be_bytes(),
                        direction: dir,
                        _pad: [0; 3],
                        addr: addr[..4].try_into().expect("4 bytes"),
                    },
                );
                match value {
                    Some(v) => m.insert(&k, v, 0),
                    None => ignore_missing(m.remove(&k)),
                }
                .map_err(map_err(MAP_NET4))
            }
            (Family::V6, false) => {
                let mut m: LpmTrie<&mut MapData, Net6Data, RulesetRef> = self.map(MAP_NET6)?;
                let k = Key::new(
                    NET_KEY_FIXED_BITS + key.cidr.len() as u32,
                    Net6Data {
                        ifindex: key.ifindex.to_be_bytes(),
                        direction: dir,
                        _pad: [0; 3],
                        addr,
                    },
                );
                match value {
                    Some(v) => m.insert(&k, v, 0),
                    None => ignore_missing(m.remove(&k)),
                }
                .map_err(map_err(MAP_NET6))
            }
        }
    }

    /// Counters of one interface, summed over CPUs.
    pub fn counters(&mut self, ifindex: u32) -> Result<Counters> {
        let ifaces: HashMap<&mut MapData, u32, IfaceConfig> = self.map(MAP_IFACE)?;
        let Ok(config) = ifaces.get(&ifindex, 0) else {
            return Ok(Counters::default());
        };
        let m: PerCpuArray<&mut MapData, Counters> = self.map(MAP_COUNTERS)?;
        let mut sum = Counters::default();
        if let Ok(values) = m.get(&config.counter_slot, 0) {
            for cpu in values.iter() {
                for (s, v) in sum.v.iter_mut().zip(cpu.v.iter()) {
                    *s += v;
                }
            }
        }
        Ok(sum)
    }

    /// Every tracked flow: (key, entry, established table or not).
    pub fn flows(&mut self) -> Result<Vec<(CtKey, CtEntry, bool)>> {
        let mut out = Vec::new();
        for (name, established) in [(MAP_CT, true), (MAP_CT_NEW, false)] {
            let m: HashMap<&mut MapData, CtKey, CtEntry> = self.map(name)?;
            for item in m.iter() {
                let (k, v) = item.map_err(map_err(name))?;
                out.push((k, v, established));
            }
        }
        Ok(out)
    }

    /// Removes every flow from both conntrack tables.
    pub fn flush_flows(&mut self) -> Result<()> {
        for name in [MAP_CT, MAP_CT_NEW] {
            let mut m: HashMap<&mut MapData, CtKey, CtEntry> = self.map(name)?;
            let keys: Vec<CtKey> = m.keys().filter_map(|k| k.ok()).collect();
            for k in keys {
                ignore_missing(m.remove(&k)).map_err(map_err(name))?;
            }
        }
        Ok(())
    }

    /// Attaches the ingress program (XDP native, or TC) and TC egress to an interface.
    pub fn attach(&mut self, iface: &str, hook: IngressHook) -> Result<()> {
        let attach_err = |source| DatapathError::Attach {
            iface: iface.to_string(),
            source,
        };
        match hook {
            IngressHook::Xdp => {
                let xdp = self.xdp_ingress()?;
                xdp.attach(iface, aya::programs::XdpMode::Driver)
                    .or_else(|e| {
                        log::warn!(
                            "{iface}: native XDP unavailable ({e}); falling back to generic XDP"
                        );
                        xdp.attach(iface, aya::programs::XdpMode::Skb)
                    })
                    .map_err(attach_err)?;
            }
            IngressHook::Tc => {
                self.tc(PROG_TC_INGRESS)?
                    .attach(iface, TcAttachType::Ingress)
                    .map_err(attach_err)?;
            }
        }
        self.tc(PROG_TC_EGRESS)?
            .attach(iface, TcAttachType::Egress)
            .map_err(attach_err)?;
        Ok(())
    }

    /// Pins every map under `dir` (which must be on a bpffs).
    pub fn pin_maps(&mut self, dir: &Path) -> Result<()> {
        for name in ALL_MAPS {
            let m = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
            m.pin(dir.join(name)).map_err(|e| DatapathError::Map {
                name,
                source: MapError::PinError {
                    name: Some(name.to_string()),
                    error: e,
                },
            })?;
        }
        Ok(())
    }
}

impl Datapath {
    /// Reads back what the maps hold, as a plan without rule metadata.
    pub fn read_back(&mut self) -> Result<Plan> {
        let mut plan = Plan::default();
        let ifaces: HashMap<&mut MapData, u32, IfaceConfig> = self.map(MAP_IFACE)?;
        for item in ifaces.iter() {
            let (ifindex, config) = item.map_err(map_err(MAP_IFACE))?;
            plan.interfaces.insert(
                ifindex,
                InterfacePlan {
                    eni: String::new(),
                    config,
                },
            );
        }
        let mut put = |ifindex: u32, direction: u8, addr: IpAddr, len: u32, ruleset: RulesetRef| {
            let key = PrefixKey {
                ifindex,
                direction: direction_of(direction),
                cidr: Cidr::truncate(addr, len as u8),
            };
            plan.prefixes.insert(key, ruleset.ruleset);
        };
        let a4: HashMap<&mut MapData, Addr4Key, RulesetRef> = self.map(MAP_ADDR4)?;
        for item in a4.iter() {
            let (k, v) = item.map_err(map_err(MAP_ADDR4))?;
            put(k.ifindex, k.direction, IpAddr::from(k.addr), 32, v);
        }
        let a6: HashMap<&mut MapData, Addr6Key, RulesetRef> = self.map(MAP_ADDR6)?;
        for item in a6.iter() {
            let (k, v) = item.map_err(map_err(MAP_ADDR6))?;
            put(k.ifindex, k.direction, IpAddr::from(k.addr), 128, v);
        }
        let n4: LpmTrie<&mut MapData, Net4Data, RulesetRef> = self.map(MAP_NET4)?;
        for item in n4.iter() {
            let (k, v) = item.map_err(map_err(MAP_NET4))?;
            let (d, len) = (k.data(), k.prefix_len() - NET_KEY_FIXED_BITS);
            put(
                u32::from_be_bytes(d.ifindex),
                d.direction,
                IpAddr::from(d.addr),
                len,
                v,
            );
        }
        let n6: LpmTrie<&mut MapData, Net6Data, RulesetRef> = self.map(MAP_NET6)?;
        for item in n6.iter() {
            let (k, v) = item.map_err(map_err(MAP_NET6))?;
            let (d, len) = (k.data(), k.prefix_len() - NET_KEY_FIXED_BITS);
            put(
                u32::from_be_bytes(d.ifindex),
                d.direction,
                IpAddr::from(d.addr),
                len,
                v,
            );
        }
        let ports: LpmTrie<&mut MapData, PortData, Grant> = self.map(MAP_PORTS)?;
        for item in ports.iter() {
            let (k, v) = item.map_err(map_err(MAP_PORTS))?;
            let d = k.data();
            let prefix = PortPrefix {
                protocol: d.protocol,
                port: u16::from_be_bytes(d.port),
                len: k.prefix_len(),
            };
            plan.rulesets
                .entry(u32::from_be_bytes(d.ruleset))
                .or_default()
                .ports
                .insert(prefix, v);
        }
        Ok(plan)
    }

    /// Attaches ingress and egress to an interface, replacing the programs of links
    /// pinned under `links_dir` atomically (an upgrade or restart) or creating and pinning
    /// new links. A link of the other ingress hook is removed.
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        ifindex: u32,
        hook: IngressHook,
        links_dir: &Path,
    ) -> Result<()> {
        std::fs::create_dir_all(links_dir).map_err(|source| DatapathError::Pin {
            what: "creating",
            path: links_dir.into(),
            source,
        })?;
        let attach_err = |source| DatapathError::Attach {
            iface: iface.to_string(),
            source,
        };
        let (ingress_name, other) = match hook {
            IngressHook::Xdp => (link_name(ifindex, "xdp"), link_name(ifindex, "tcin")),
            IngressHook::Tc => (link_name(ifindex, "tcin"), link_name(ifindex, "xdp")),
        };
        let egress_name = link_name(ifindex, "tcout");
        // Ingress.
        let path = links_dir.join(&ingress_name);
        match (hook, pinned_link(&path)?) {
            (IngressHook::Xdp, Some(link)) => {
                let xdp = self.xdp_ingress()?;
                let link = XdpLink::try_from(link).map_err(|source| DatapathError::Link {
                    iface: iface.to_string(),
                    source,
                })?;
                let id = xdp.attach_to_link(link).map_err(attach_err)?;
                drop(xdp.take_link(id).map_err(attach_err)?);
            }
            (IngressHook::Xdp, None) => {
                let xdp = self.xdp_ingress()?;
                let id = match xdp.attach(iface, aya::programs::XdpMode::Driver) {
                    Ok(id) => id,
                    Err(e) => {
                        log::warn!(
                            "{iface}: native XDP unavailable ({e}); falling back to generic XDP"
                        );
                        xdp.attach(iface, aya::programs::XdpMode::Skb)
                            .map_err(attach_err)?
                    }
                };
                let link: FdLink =
                    xdp.take_link(id)
                        .map_err(attach_err)?
                        .try_into()
                        .map_err(|source| DatapathError::Link {
                            iface: iface.to_string(),
                            source,
                        })?;
                pin_link(link, &path)?;
            }
            (IngressHook::Tc, existing) => self.attach_tc(
                iface,
                PROG_TC_INGRESS,
                TcAttachType::Ingress,
                existing,
                &path,
            )?,
        }
        // Egress.
        let path = links_dir.join(&egress_name);
        let existing = pinned_link(&path)?;
        self.attach_tc(iface, PROG_TC_EGRESS, TcAttachType::Egress, existing, &path)?;
        // The other ingress hook, from an earlier run with another --ingress-hook.
        unpin_link(&links_dir.join(other))?;
        Ok(())
    }

    fn attach_tc(
        &mut self,
        iface: &str,
        name: &'static str,
        kind: TcAttachType,
        existing: Option<FdLink>,
        path: &Path,
    ) -> Result<()> {
        let attach_err = |source| DatapathError::Attach {
            iface: iface.to_string(),
            source,
        };
        let prog = self.tc(name)?;
        match existing {
            Some(link) => {
                let link =
                    SchedClassifierLink::try_from(link).map_err(|source| DatapathError::Link {
                        iface: iface.to_string(),
                        source,
                    })?;
                let id = prog.attach_to_link(link).map_err(attach_err)?;
                drop(prog.take_link(id).map_err(attach_err)?);
            }
            None => {
                let id = prog.attach(iface, kind).map_err(attach_err)?;
                let link: FdLink =
                    prog.take_link(id)
                        .map_err(attach_err)?
                        .try_into()
                        .map_err(|source| DatapathError::Link {
                            iface: iface.to_string(),
                            source,
                        })?;
                pin_link(link, path)?;
            }
        }
        Ok(())
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
        let mut a: Array<&mut MapData, StatusBlob> = self.map(MAP_STATUS)?;
        a.set(0, *blob, 0).map_err(map_err(MAP_STATUS))
    }
}

/// Names of link pins: `<ifindex>-xdp`, `<ifindex>-tcin`, `<ifindex>-tcout`.
pub fn link_name(ifindex: u32, kind: &str) -> String {
    format!("{ifindex}-{kind}")
}

fn pinned_link(path: &Path) -> Result<Option<FdLink>> {
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

fn pin_link(link: FdLink, path: &Path) -> Result<()> {
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

/// The layout each map must have: type, key size, value size.
fn expected_layout(name: &str) -> Option<(MapType, u32, u32)> {
    use std::mem::size_of as sz;
    let lpm = |d: usize| 4 + d as u32;
    Some(match name {
        MAP_CT | MAP_CT_NEW => (
            if name == MAP_CT {
                MapType::Hash
            } else {
                MapType::LruHash
            },
            sz::<CtKey>() as u32,
            sz::<CtEntry>() as u32,
        ),
        MAP_ADDR4 => (MapType::Hash, sz::<Addr4Key>() as u32, 4),
        MAP_ADDR6 => (MapType::Hash, sz::<Addr6Key>() as u32, 4),
        MAP_NET4 => (MapType::LpmTrie, lpm(sz::<Net4Data>()), 4),
        MAP_NET6 => (MapType::LpmTrie, lpm(sz::<Net6Data>()), 4),
        MAP_PORTS => (
            MapType::LpmTrie,
            lpm(sz::<PortData>()),
            sz::<Grant>() as u32,
        ),
        MAP_IFACE => (MapType::Hash, 4, sz::<IfaceConfig>() as u32),
        MAP_GLOBAL => (MapType::Array, 4, sz::<GlobalConfig>() as u32),
        MAP_COUNTERS => (MapType::PerCpuArray, 4, sz::<Counters>() as u32),
        MAP_RULE_HITS => (MapType::PerCpuArray, 4, 8),
        MAP_FRAGS => (
            MapType::LruHash,
            sz::<FragKey>() as u32,
            sz::<FragEntry>() as u32,
        ),
        MAP_EVENT_RATE => (MapType::PerCpuArray, 4, sz::<EventRate>() as u32),
        MAP_STATUS => (MapType::Array, 4, sz::<StatusBlob>() as u32),
        _ => return None,
    })
}

/// Refuses to adopt pinned maps whose layout differs from this agent's.
fn check_pinned_layouts(pin_dir: &Path) -> Result<()> {
    for name in ALL_MAPS {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let Some((kind, key, value)) = expected_layout(name) else {
            continue;
        };
        let info = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(map_err(name))?;
        let found_kind = info.map_type().map_err(map_err(name))?;
        if found_kind != kind || info.key_size() != key || info.value_size() != value {
            return Err(DatapathError::Layout {
                path,
                found: format!(
                    "{found_kind:?} key {} value {}",
                    info.key_size(),
                    info.value_size()
                ),
                expected: format!("{kind:?} key {key} value {value}"),
            });
        }
    }
    Ok(())
}

/// The status document (if any) and, per enforced ifindex, its settings and counters.
pub type PinnedStatus = (Option<String>, BTreeMap<u32, (IfaceConfig, Counters)>);

/// Reads the status document and per-interface counters from pins, for `status`.
pub fn pinned_status(pin_dir: &Path) -> Result<PinnedStatus> {
    let open = |name: &'static str| MapData::from_pin(pin_dir.join(name)).map_err(map_err(name));
    let mut doc = None;
    if pin_dir.join(MAP_STATUS).exists() {
        let a: Array<MapData, StatusBlob> =
            Array::try_from(aya::maps::Map::Array(open(MAP_STATUS)?))
                .map_err(map_err(MAP_STATUS))?;
        let blob = a.get(&0, 0).map_err(map_err(MAP_STATUS))?;
        let n = (blob.len as usize).min(STATUS_BYTES);
        if n > 0 {
            doc = Some(String::from_utf8_lossy(&blob.data[..n]).into_owned());
        }
    }
    let mut out = BTreeMap::new();
    if pin_dir.join(MAP_IFACE).exists() {
        let ifaces: HashMap<MapData, u32, IfaceConfig> =
            HashMap::try_from(aya::maps::Map::HashMap(open(MAP_IFACE)?))
                .map_err(map_err(MAP_IFACE))?;
        let counters: PerCpuArray<MapData, Counters> =
            PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open(MAP_COUNTERS)?))
                .map_err(map_err(MAP_COUNTERS))?;
        for item in ifaces.iter() {
            let (ifindex, config) = item.map_err(map_err(MAP_IFACE))?;
            let mut sum = Counters::default();
            if let Ok(values) = counters.get(&config.counter_slot, 0) {
                for cpu in values.iter() {
                    for (s, v) in sum.v.iter_mut().zip(cpu.v.iter()) {
                        *s += v;
                    }
                }
            }
            out.insert(ifindex, (config, sum));
        }
    }
    Ok((doc, out))
}

/// Every flow in the pinned conntrack tables: (key, entry, established).
pub fn pinned_flows(pin_dir: &Path) -> Result<Vec<(CtKey, CtEntry, bool)>> {
    let mut out = Vec::new();
    for (name, established) in [(MAP_CT, true), (MAP_CT_NEW, false)] {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let data = MapData::from_pin(&path).map_err(map_err(name))?;
        let map = if established {
            aya::maps::Map::HashMap(data)
        } else {
            aya::maps::Map::LruHashMap(data)
        };
        let m: HashMap<MapData, CtKey, CtEntry> = HashMap::try_from(map).map_err(map_err(name))?;
        for item in m.iter() {
            let (k, v) = item.map_err(map_err(name))?;
            out.push((k, v, established));
        }
    }
    Ok(out)
}

/// Deletes flows from the pinned or loaded tables.
impl Datapath {
    pub fn delete_flows(&mut self, keys: &[(CtKey, bool)]) -> Result<usize> {
        let mut n = 0;
        for (established, name) in [(true, MAP_CT), (false, MAP_CT_NEW)] {
            let mut m: HashMap<&mut MapData, CtKey, CtEntry> = self.map(name)?;
            for (k, e) in keys {
                if *e == established && m.remove(k).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
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

fn per_cpu_zero<T: aya::Pod + Default + Clone>() -> Result<PerCpuValues<T>> {
    let io = |call, io_error| DatapathError::Map {
        name: MAP_COUNTERS,
        source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
    };
    let cpus = nr_cpus().map_err(|(_, e)| io("nr_cpus", e))?;
    PerCpuValues::try_from(vec![T::default(); cpus]).map_err(|e| io("per_cpu_values", e))
}

fn ignore_missing(r: std::result::Result<(), MapError>) -> std::result::Result<(), MapError> {
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

/// Helpers to present map contents in user terms.
pub fn addr_of(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(*bytes)
    }
}

pub fn direction_of(code: u8) -> Direction {
    if code == DIR_INGRESS {
        Direction::Ingress
    } else {
        Direction::Egress
    }
}

pub fn host_cidr(addr: IpAddr) -> Cidr {
    Cidr::host(addr)
}
