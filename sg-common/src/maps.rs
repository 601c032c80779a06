//! Map names, keys and values. One definition, used by `sg-ebpf` and `sg-agent`.

use core::mem::size_of;

// Map names, kinds, sizes and writers live in `registry`: one table for everything.
pub use crate::registry::names::*;

// ---- Program names ----
pub const PROG_XDP_INGRESS: &str = "sg_xdp_ingress";
pub const PROG_TC_INGRESS: &str = "sg_tc_ingress";
pub const PROG_TC_EGRESS: &str = "sg_tc_egress";
/// Benchmark floors, in the separate benchmark object (`sg-ebpf-bench`), never attached:
/// an empty XDP program and one hash lookup.
pub const PROG_BENCH_EMPTY: &str = "sg_bench_empty";
pub const PROG_BENCH_HASH: &str = "sg_bench_hash";
/// Drops every frame: the physical limit the peers benchmark measures filters against.
pub const PROG_BENCH_DROP: &str = "sg_bench_drop";
/// Benchmark traffic generator (BPF_PROG_RUN live frames), in the benchmark object.
pub const PROG_GEN: &str = "sg_gen";
/// The plain hash map of the `sg_bench_hash` floor (IPv4 source address → 1), in the
/// benchmark object.
pub const MAP_BENCH: &str = "SG_BENCH";

/// Key of the exact-address stage, IPv4. `addr` is network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Addr4Key {
    pub ifindex: u32,
    pub direction: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<Addr4Key>() == 12);

/// Key of the exact-address stage, IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Addr6Key {
    pub ifindex: u32,
    pub direction: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<Addr6Key>() == 24);

/// LPM data of the CIDR stage, IPv4. The trie compares bits from the start of this struct,
/// so the LPM prefix length is `NET_KEY_FIXED_BITS + cidr_prefix_len`: interface and
/// direction always match exactly, the address by its CIDR length. `ifindex` is stored
/// big-endian so the bit order is the same on every host.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Net4Data {
    pub ifindex: [u8; 4],
    pub direction: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<Net4Data>() == 12);

/// LPM data of the CIDR stage, IPv6 (see `Net4Data`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Net6Data {
    pub ifindex: [u8; 4],
    pub direction: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<Net6Data>() == 24);

/// Bits of a CIDR-stage key before the address: ifindex (32) + direction and pad (32).
pub const NET_KEY_FIXED_BITS: u32 = 64;

/// LPM data of the port stage. Prefix length: 32 = every protocol of the ruleset; 40 = one
/// protocol, every port (or every ICMP type); 40 + n = the first n bits of the port (or of
/// `icmp_type << 8 | icmp_code`). 56 is one exact port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PortData {
    pub ruleset: [u8; 4],
    pub protocol: u8,
    pub port: [u8; 2],
    pub _pad: u8,
}
const _: () = assert!(size_of::<PortData>() == 8);

pub const PORT_KEY_RULESET_BITS: u32 = 32;
pub const PORT_KEY_PROTO_BITS: u32 = 40;
pub const PORT_KEY_FULL_BITS: u32 = 56;

/// Value of the address stages: the ruleset that applies to the remote address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RulesetRef {
    pub ruleset: u32,
}
const _: () = assert!(size_of::<RulesetRef>() == 4);

/// Port-stage flag: a TCP flow admitted here is untracked (SPEC §1.11).
pub const GRANT_UNTRACKED_TCP: u32 = 1;
/// Port-stage flag: a UDP flow admitted here is untracked.
pub const GRANT_UNTRACKED_UDP: u32 = 2;

/// Value of the port stage: which rule admits the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Grant {
    pub rule_id: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<Grant>() == 8);

/// Per enforced interface settings, keyed by ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IfaceConfig {
    pub flags: u32,
    /// Idle timeouts in seconds, indexed by `ct::TIMEOUT_*`.
    pub timeouts: [u32; crate::ct::TIMEOUT_COUNT],
    /// Index of the interface's entry in `SG_COUNTERS` (an array: no hash on the fast path).
    pub counter_slot: u32,
}
const _: () = assert!(size_of::<IfaceConfig>() == 44);

/// Global settings; array map of one element.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct GlobalConfig {
    /// Added to the boot clock; tests advance it to expire flows without sleeping.
    pub clock_offset_ns: u64,
    /// Denied-flow events per second per CPU (0 = none).
    pub deny_events_per_sec: u32,
    /// Entries of `SG_CT_SLOTS`, the index of the established table that lets the
    /// datapath expire flows by itself (0: none yet; the agent sets it at every start).
    pub ct_slots: u32,
}
const _: () = assert!(size_of::<GlobalConfig>() == 16);

/// Conntrack key. "Local" is the enforced interface's side, so both directions of a flow
/// build the same key. For ICMP echo `local_port` is the identifier and `remote_port` the
/// direction the echo request travelled (so only a reply matches the other way); for
/// protocols without ports both are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CtKey {
    pub ifindex: u32,
    pub family: u8,
    pub protocol: u8,
    pub local_port: [u8; 2],
    pub remote_port: [u8; 2],
    pub _pad: [u8; 2],
    pub local: [u8; 16],
    pub remote: [u8; 16],
}
const _: () = assert!(size_of::<CtKey>() == 44);

/// Conntrack value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtEntry {
    /// CLOCK_BOOTTIME nanoseconds (plus the global offset) of the last packet.
    pub last_seen_ns: u64,
    pub created_ns: u64,
    /// Indexed by direction (`DIR_INGRESS`, `DIR_EGRESS`).
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// Rule that admitted the flow (0: adopted or unknown).
    pub rule_id: u32,
    /// Direction of the packet that opened the flow.
    pub origin: u8,
    /// `ct::TCP_*` for TCP, 0 otherwise.
    pub tcp_state: u8,
    /// `ct::FLAG_*`.
    pub flags: u8,
    pub _pad: u8,
    /// TCP: what each direction's sender was last seen to send and acknowledge, indexed
    /// by direction, for the sequence checks of RST and FIN (SPEC §1.11).
    pub tcp: [TcpSide; 2],
}
const _: () = assert!(size_of::<CtEntry>() == 80);

/// One TCP sender of a flow, as conntrack saw it (`ct::SIDE_*` say what is known).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TcpSide {
    /// The sequence number after the last byte (SYN and FIN count one) it sent.
    pub end: u32,
    /// Its last acknowledgement, and the window it advertised with it (unscaled).
    pub ack: u32,
    pub win: u16,
    pub known: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<TcpSide>() == 12);

/// The conntrack entry of the build before sequence tracking (pinned as `SG_CT` and
/// `SG_CT_NEW`): read once, when an upgraded agent moves its flows into the new tables.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntryV1 {
    pub last_seen_ns: u64,
    pub created_ns: u64,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub rule_id: u32,
    pub origin: u8,
    pub tcp_state: u8,
    pub flags: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<CtEntryV1>() == 56);

impl CtEntryV1 {
    /// The same flow with nothing known of its sequence numbers (learnt from its next
    /// packets, as netfilter picks up a connection).
    pub fn upgrade(&self) -> CtEntry {
        CtEntry {
            last_seen_ns: self.last_seen_ns,
            created_ns: self.created_ns,
            packets: self.packets,
            bytes: self.bytes,
            rule_id: self.rule_id,
            origin: self.origin,
            tcp_state: self.tcp_state,
            flags: self.flags,
            _pad: 0,
            tcp: [TcpSide::default(); 2],
        }
    }
}

/// Key of a remembered first-fragment verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub ifindex: u32,
    pub family: u8,
    pub protocol: u8,
    /// The direction the datagram travels (`DIR_*`): a verdict on ingress never lets
    /// fragments out, nor the reverse.
    pub direction: u8,
    pub _pad: u8,
    pub id: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}
const _: () = assert!(size_of::<FragKey>() == 44);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragEntry {
    /// Boot-clock seconds (plus the global offset) of the first fragment: later
    /// fragments follow it for `REASSEMBLY_TIMEOUT_S` only.
    pub seen_s: u32,
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    /// 1 = pass (only allowed first fragments are remembered).
    pub allowed: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FragEntry>() == 12);

/// How long a first fragment's verdict is followed (Linux's `ipfrag_time` default).
pub const REASSEMBLY_TIMEOUT_S: u32 = 30;

/// Per-interface counters, both directions: packets in `v[direction * PER_DIRECTION +
/// slot]`, their frame bytes at the same index in `bytes`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Counters {
    pub v: [u64; 2 * crate::counter::PER_DIRECTION as usize],
    pub bytes: [u64; 2 * crate::counter::PER_DIRECTION as usize],
}
const _: () = assert!(size_of::<Counters>() == 1024);

impl Default for Counters {
    fn default() -> Self {
        Counters {
            v: [0; 64],
            bytes: [0; 64],
        }
    }
}

impl Counters {
    #[inline(always)]
    pub const fn index(direction: u8, slot: u32) -> usize {
        (direction as u32 * crate::counter::PER_DIRECTION + slot) as usize
    }
}

/// Per-CPU rate-limit state of denied-flow events.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EventRate {
    pub window_start_ns: u64,
    pub count: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<EventRate>() == 16);

pub const EVENT_ADMITTED: u8 = 1;
pub const EVENT_DENIED: u8 = 2;
/// Would have been denied; passed by audit mode.
pub const EVENT_AUDITED: u8 = 3;

/// A flow event in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowEvent {
    pub time_ns: u64,
    pub ifindex: u32,
    /// `EVENT_ADMITTED`: the rule that admitted the flow. `EVENT_DENIED` and
    /// `EVENT_AUDITED`: the drop reason (`drop_reason::*`).
    pub detail: u32,
    pub kind: u8,
    pub direction: u8,
    pub family: u8,
    pub protocol: u8,
    pub local_port: [u8; 2],
    pub remote_port: [u8; 2],
    pub local: [u8; 16],
    pub remote: [u8; 16],
    /// Bytes of the frame.
    pub bytes: u32,
    /// TCP flags of the packet (0 for other protocols).
    pub tcp_flags: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowEvent>() == 64);

/// Bytes of a status document.
pub const STATUS_BYTES: usize = 16 * 1024 - 4;

/// Value of `SG_STATUS`: a length-prefixed JSON document.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StatusBlob {
    pub len: u32,
    pub data: [u8; STATUS_BYTES],
}
const _: () = assert!(size_of::<StatusBlob>() == 16 * 1024);

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for StatusBlob {}
    use super::*;
    // SAFETY: each type is `repr(C)`, `Copy`, made only of integers and byte arrays with
    // explicit padding, so every bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for Addr4Key {}
    unsafe impl aya::Pod for Addr6Key {}
    unsafe impl aya::Pod for Net4Data {}
    unsafe impl aya::Pod for Net6Data {}
    unsafe impl aya::Pod for PortData {}
    unsafe impl aya::Pod for RulesetRef {}
    unsafe impl aya::Pod for Grant {}
    unsafe impl aya::Pod for IfaceConfig {}
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for CtEntryV1 {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragEntry {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for EventRate {}
    unsafe impl aya::Pod for FlowEvent {}
}
