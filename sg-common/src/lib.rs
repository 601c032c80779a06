//! The one definition of everything the sg kernel programs and the agent share: map names,
//! map keys and values (their wire layout), counter and drop-reason codes, and the pure
//! decisions (TCP state transitions, timeout choice, port-range splitting) that both sides
//! must compute identically.
//!
//! Layout rules: every struct is `#[repr(C)]` with explicit `_pad` fields and a size
//! assertion; addresses and ports are network-order byte arrays; no `bool` or Rust enums
//! inside map structs. A layout change renames the map with a `_V2` suffix so a pinned map
//! of the old layout is never reused.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod ct;
pub mod maps;
pub mod ports;
pub mod registry;

pub use maps::*;

/// Direction of a packet relative to the enforced interface's owner (the "local" side).
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// The other direction: where the reply of a packet travelling `dir` goes.
#[inline(always)]
pub const fn opposite(dir: u8) -> u8 {
    dir ^ 1
}

/// EtherTypes the datapath looks at.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const IPV6: u16 = 0x86DD;
    pub const ARP: u16 = 0x0806;
    pub const VLAN: u16 = 0x8100;
    pub const QINQ: u16 = 0x88A8;
}

/// ICMP query flows (SPEC §1.3) keep the identifier in `CtKey::local_port` and, in
/// `CtKey::remote_port`, this mark ORed with the query pair (`ct::icmp_query`) shifted left
/// by one and the direction the request travelled: only the matching reply matches the
/// other way, and a same-id request from the peer is a new flow.
pub const ECHO_PORT_MARK: u16 = 0x100;

/// `CtKey::remote_port` of an ICMP query flow of `pair` whose request travelled `origin`.
#[inline(always)]
pub const fn icmp_query_port(pair: u8, origin: u8) -> u16 {
    ECHO_PORT_MARK | ((pair as u16 & 3) << 1) | (origin as u16 & 1)
}

/// Kinds of link pin per interface (`<ifindex>-<kind>` under `links/`): XDP ingress, TC
/// ingress, TC egress.
pub mod link_kind {
    pub const XDP: &str = "xdp";
    pub const TC_INGRESS: &str = "tcin";
    pub const TC_EGRESS: &str = "tcout";
    pub const ALL: [&str; 3] = [XDP, TC_INGRESS, TC_EGRESS];
}

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// `IfaceConfig::flags`: audit mode (SPEC §7): every packet passes; what would have been
/// dropped is counted and logged as such.
pub const IFACE_AUDIT: u32 = 1;

/// Counter slots, per interface and direction (`Counters::index`).
pub mod counter {
    pub const ALLOWED_NEW: u32 = 0;
    pub const ALLOWED_TRACKED: u32 = 1;
    pub const ALLOWED_UNTRACKED: u32 = 2;
    pub const ALLOWED_RELATED: u32 = 3;
    pub const ALLOWED_FRAGMENT: u32 = 4;
    pub const INFRASTRUCTURE: u32 = 5;
    pub const NOT_IP: u32 = 6;
    /// Allowed stateless (an echo reply or other packet with no flow to open).
    pub const ALLOWED_STATELESS: u32 = 7;
    /// A flow event that the full ring could not take (SPEC §7: losses are counted).
    pub const EVENTS_LOST: u32 = 8;
    /// A rule hit whose rule id lies beyond the hit map.
    pub const RULE_HITS_LOST: u32 = 9;
    /// A packet that would have been dropped, passed because the interface is in audit
    /// mode (SPEC §7); it is also counted under its drop reason.
    pub const AUDIT_PASSED: u32 = 10;
    /// A denied-packet event left out by the kernel's rate limit (flow logs: SKIPDATA).
    pub const EVENTS_SUPPRESSED: u32 = 11;
    pub const ALLOW_SLOTS: u32 = 16;
    /// Drop reasons occupy `ALLOW_SLOTS + reason`.
    pub const fn drop_slot(reason: u32) -> u32 {
        ALLOW_SLOTS + reason
    }
    pub const PER_DIRECTION: u32 = 32;
    pub const NAMES: [&str; 12] = [
        "allowed_new",
        "allowed_tracked",
        "allowed_untracked",
        "allowed_related",
        "allowed_fragment",
        "infrastructure",
        "not_ip",
        "allowed_stateless",
        "events_lost",
        "rule_hits_lost",
        "audit_passed",
        "events_suppressed",
    ];
}

/// Why a packet was dropped. One list, shared with user space (status, flow events).
pub mod drop_reason {
    pub const POLICY: u32 = 1;
    pub const TRUNCATED_ETHERNET: u32 = 2;
    pub const TRUNCATED_IP: u32 = 3;
    pub const BAD_IHL: u32 = 4;
    pub const BAD_LENGTH: u32 = 5;
    pub const TRUNCATED_L4: u32 = 6;
    pub const EXT_CHAIN_TOO_LONG: u32 = 7;
    pub const FRAGMENT_ORPHAN: u32 = 8;
    /// The conntrack table is full: AWS's `conntrack_allowance_exceeded`.
    pub const CONNTRACK_FULL: u32 = 9;
    pub const VLAN_TOO_DEEP: u32 = 10;
    pub const BAD_IP_VERSION: u32 = 11;
    /// A TCP flag combination no real stack sends (netfilter's `tcp_valid_flags`).
    pub const INVALID_TCP_FLAGS: u32 = 12;
    /// A second IPv6 fragment header (SPEC §2).
    pub const FRAGMENT_HEADER_TWICE: u32 = 13;
    /// A RST whose sequence number is not plausible for its flow (SPEC §1.11).
    pub const TCP_OUT_OF_WINDOW: u32 = 14;
    pub const COUNT: u32 = 15;
    pub const NAMES: [&str; COUNT as usize] = [
        "none",
        "policy",
        "truncated_ethernet",
        "truncated_ip",
        "bad_ihl",
        "bad_length",
        "truncated_l4",
        "ext_chain_too_long",
        "fragment_orphan",
        "conntrack_allowance_exceeded",
        "vlan_too_deep",
        "bad_ip_version",
        "invalid_tcp_flags",
        "fragment_header_twice",
        "tcp_out_of_window",
    ];
}

/// Maximum IPv6 extension headers walked before the packet is dropped as unparseable.
pub const IPV6_EXT_WALK_LIMIT: usize = 6;
