//! Policy on a conntrack miss: a constant number of map lookups whatever the number of
//! rules, groups, members or prefix-list entries.
//! 1. Address stage: the remote address in the exact table (group members, /32, /128),
//!    else the longest prefix in the CIDR trie. The compiler flattened overlapping
//!    prefixes, so the one answer is the union of every rule whose peer contains it.
//! 2. Port stage: {ruleset, protocol, port} in the port trie; any match allows.

use aya_ebpf::maps::lpm_trie::Key;
use sg_common::*;

use crate::{
    maps::{SG_ADDR4, SG_ADDR6, SG_NET4, SG_NET6, SG_PORTS},
    parse::Ip,
};

/// The remote side of a packet travelling `dir`: the source on ingress, the
/// destination on egress.
#[inline(always)]
pub fn remote_of(dir: u8, ip: &Ip) -> &[u8; 16] {
    if dir == DIR_INGRESS {
        &ip.src
    } else {
        &ip.dst
    }
}

#[inline(always)]
fn ruleset_of(ifindex: u32, dir: u8, family: u8, remote: &[u8; 16]) -> Option<u32> {
    let remote = *remote;
    if family == FAMILY_V4 {
        let mut addr = [0u8; 4];
        addr.copy_from_slice(&remote[..4]);
        let exact = Addr4Key {
            ifindex,
            direction: dir,
            _pad: [0; 3],
            addr,
        };
        // SAFETY: read-only lookups of plain-old-data values.
        if let Some(r) = unsafe { SG_ADDR4.get(&exact) } {
            return Some(r.ruleset);
        }
        let key = Key::new(
            NET_KEY_FIXED_BITS + 32,
            Net4Data {
                ifindex: ifindex.to_be_bytes(),
                direction: dir,
                _pad: [0; 3],
                addr,
            },
        );
        SG_NET4.get(&key).map(|r| r.ruleset)
    } else {
        let exact = Addr6Key {
            ifindex,
            direction: dir,
            _pad: [0; 3],
            addr: remote,
        };
        // SAFETY: as above.
        if let Some(r) = unsafe { SG_ADDR6.get(&exact) } {
            return Some(r.ruleset);
        }
        let key = Key::new(
            NET_KEY_FIXED_BITS + 128,
            Net6Data {
                ifindex: ifindex.to_be_bytes(),
                direction: dir,
                _pad: [0; 3],
                addr: remote,
            },
        );
        SG_NET6.get(&key).map(|r| r.ruleset)
    }
}

/// The "port" a rule matches: the destination port for TCP and UDP (the local port on
/// ingress, the remote port on egress), `type << 8 | code` for ICMP, 0 otherwise.
#[inline(always)]
pub fn policy_port(ip: &Ip) -> u16 {
    match ip.protocol {
        PROTO_TCP | PROTO_UDP => ip.l4.dport,
        PROTO_ICMP | PROTO_ICMPV6 => (ip.l4.icmp_type as u16) << 8 | ip.l4.icmp_code as u16,
        _ => 0,
    }
}

/// The grant that admits a new packet, if any rule does.
#[inline(always)]
pub fn lookup(ifindex: u32, dir: u8, ip: &Ip) -> Option<Grant> {
    lookup_at(
        ifindex,
        dir,
        ip.family,
        remote_of(dir, ip),
        ip.protocol,
        policy_port(ip),
    )
}

/// The grant of a packet described by its parts: remote address, protocol and policy
/// port, travelling `dir`.
#[inline(always)]
pub fn lookup_at(
    ifindex: u32,
    dir: u8,
    family: u8,
    remote: &[u8; 16],
    protocol: u8,
    port: u16,
) -> Option<Grant> {
    let ruleset = ruleset_of(ifindex, dir, family, remote)?;
    let key = Key::new(
        PORT_KEY_FULL_BITS,
        PortData {
            ruleset: ruleset.to_be_bytes(),
            protocol,
            port: port.to_be_bytes(),
            _pad: 0,
        },
    );
    SG_PORTS.get(&key).copied()
}
