//! Fragments (SPEC §2): the first fragment is judged like any packet and, when allowed,
//! its verdict is remembered for the datagram; later fragments follow it, and a later
//! fragment with no remembered verdict is dropped.

use sg_common::{counter, drop_reason, *};

use crate::{account::count, maps::SG_FRAGS_V2, parse::Ip};

#[inline(always)]
fn frag_key(ifindex: u32, dir: u8, ip: &Ip) -> FragKey {
    FragKey {
        ifindex,
        family: ip.family,
        // IPv6 identifies a datagram without its protocol (RFC 8200): a later fragment's
        // header names the first header of the fragmentable part, not the L4 protocol.
        protocol: if ip.family == FAMILY_V4 {
            ip.protocol
        } else {
            0
        },
        direction: dir,
        _pad: 0,
        id: ip.frag_id,
        src: ip.src,
        dst: ip.dst,
    }
}

/// Remembers an allowed first fragment's verdict. A denied one is not remembered: its
/// later fragments find nothing and are dropped, and denied senders cannot evict the
/// verdicts of allowed ones (SPEC §2).
#[inline(always)]
pub fn remember(ifindex: u32, dir: u8, ip: &Ip, now_s: u32) {
    let entry = FragEntry {
        seen_s: now_s,
        src_port: ip.l4.sport.to_be_bytes(),
        dst_port: ip.l4.dport.to_be_bytes(),
        allowed: 1,
        _pad: [0; 3],
    };
    let _ = SG_FRAGS_V2.insert(&frag_key(ifindex, dir, ip), &entry, 0);
}

/// A non-first fragment follows its first fragment's verdict for the reassembly timeout;
/// with none remembered (denied, lost, evicted, expired or forged), it is dropped.
#[inline(always)]
pub fn later(counters: u32, ifindex: u32, dir: u8, ip: &Ip, now_s: u32, bytes: u32) -> bool {
    // SAFETY: read-only lookup.
    match unsafe { SG_FRAGS_V2.get(&frag_key(ifindex, dir, ip)) } {
        Some(e) if e.allowed != 0 && now_s.wrapping_sub(e.seen_s) <= REASSEMBLY_TIMEOUT_S => {
            count(counters, dir, counter::ALLOWED_FRAGMENT, bytes);
            true
        }
        _ => {
            count(
                counters,
                dir,
                counter::drop_slot(drop_reason::FRAGMENT_ORPHAN),
                bytes,
            );
            false
        }
    }
}
