//! Fragments (SPEC §2): the first fragment is judged like any packet and, when allowed,
//! its verdict is remembered for the datagram; later fragments follow it, and a later
//! fragment with no remembered verdict is dropped.

use sg_common::{counter, drop_reason, *};

use crate::{account::count, maps::SG_FRAGS, parse::Ip};

#[inline(always)]
fn frag_key(ifindex: u32, ip: &Ip) -> FragKey {
    FragKey {
        ifindex,
        family: ip.family,
        protocol: ip.protocol,
        _pad: [0; 2],
        id: ip.frag_id,
        src: ip.src,
        dst: ip.dst,
    }
}

#[inline(always)]
pub fn remember(ifindex: u32, ip: &Ip, pass: bool) {
    let entry = FragEntry {
        src_port: ip.l4.sport.to_be_bytes(),
        dst_port: ip.l4.dport.to_be_bytes(),
        allowed: pass as u8,
        _pad: [0; 3],
    };
    let _ = SG_FRAGS.insert(&frag_key(ifindex, ip), &entry, 0);
}

/// A non-first fragment follows its first fragment's verdict; with none remembered
/// (lost, evicted or forged), it is dropped.
#[inline(always)]
pub fn later(counters: u32, ifindex: u32, dir: u8, ip: &Ip) -> bool {
    // SAFETY: read-only lookup.
    match unsafe { SG_FRAGS.get(&frag_key(ifindex, ip)) } {
        Some(e) if e.allowed != 0 => {
            count(counters, dir, counter::ALLOWED_FRAGMENT);
            true
        }
        Some(_) => {
            count(counters, dir, counter::drop_slot(drop_reason::POLICY));
            false
        }
        None => {
            count(
                counters,
                dir,
                counter::drop_slot(drop_reason::FRAGMENT_ORPHAN),
            );
            false
        }
    }
}
