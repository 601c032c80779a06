//! The datapath: load the eBPF object, write plans into its maps in the order the compiler
//! gives, attach the programs, read counters and flows back. The only module that touches
//! aya.

use std::{net::IpAddr, path::Path};

use aya::{
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, PerCpuHashMap, PerCpuValues,
    },
    programs::{tc, ProgramError, SchedClassifier, TcAttachType, Xdp},
    util::nr_cpus,
    Ebpf, EbpfError, EbpfLoader,
};
use sg_common::*;

use crate::{
    compile::{diff, MapOp, Plan, PortPrefix, PrefixKey},
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
        if object.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let mut loader = EbpfLoader::new();
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
        {
            let xdp: &mut Xdp = program(&mut ebpf, PROG_XDP_INGRESS)?;
            xdp.load().map_err(prog_err(PROG_XDP_INGRESS))?;
        }
        for name in [PROG_TC_INGRESS, PROG_TC_EGRESS] {
            let p: &mut SchedClassifier = program(&mut ebpf, name)?;
            p.load().map_err(prog_err(name))?;
        }
        let mut dp = Datapath { ebpf };
        dp.set_global(GlobalConfig {
            clock_offset_ns: 0,
            deny_events_per_sec: 100,
            flags: 0,
        })?;
        Ok(dp)
    }

    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn xdp_ingress(&mut self) -> Result<&mut Xdp> {
        program(&mut self.ebpf, PROG_XDP_INGRESS)
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
            MapOp::PutInterface { ifindex, plan } => {
                // Counters first: the datapath only counts into an existing entry.
                let mut counters: PerCpuHashMap<&mut MapData, u32, Counters> =
                    self.map(MAP_COUNTERS)?;
                if counters.get(ifindex, 0).is_err() {
                    counters
                        .insert(ifindex, per_cpu_zero()?, 0)
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
        let m: PerCpuHashMap<&mut MapData, u32, Counters> = self.map(MAP_COUNTERS)?;
        let mut sum = Counters::default();
        if let Ok(values) = m.get(&ifindex, 0) {
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
        // clsact may already exist (EEXIST); TCX links do not need it at all on 6.6+.
        let _ = tc::qdisc_add_clsact(iface);
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
