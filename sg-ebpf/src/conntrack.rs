//! Connection tracking. Both directions of a flow build the same key ("local" is the
//! enforced interface's side), so one lookup per table finds a flow whichever way the
//! packet goes. New flows live in the LRU table `SG_CT_NEW` until they are assured (reply
//! seen; TCP established), then move to `SG_CT`, which new flows can never evict: a flood
//! of new flows churns only the embryonic table (netfilter's early-drop idea).

use aya_ebpf::bindings::BPF_NOEXIST;
use sg_common::{ct::*, *};

use crate::{
    maps::{SG_CT, SG_CT_NEW},
    parse::{Ip, L4},
};

/// The ICMP query a packet is (request or reply, and its pair), if it is one.
#[inline(always)]
pub fn query_of(ip: &Ip) -> Option<(bool, u8)> {
    match ip.protocol {
        PROTO_ICMP if ip.family == FAMILY_V4 => icmp_query(false, ip.l4.icmp_type),
        PROTO_ICMPV6 if ip.family == FAMILY_V6 => icmp_query(true, ip.l4.icmp_type),
        _ => None,
    }
}

/// The conntrack key of a packet travelling in `dir` on `ifindex`.
#[inline(always)]
pub fn key_of(ifindex: u32, dir: u8, ip: &Ip) -> CtKey {
    let l4: &L4 = &ip.l4;
    let (local, remote, lport, rport) = if dir == DIR_INGRESS {
        (ip.dst, ip.src, l4.dport, l4.sport)
    } else {
        (ip.src, ip.dst, l4.sport, l4.dport)
    };
    let (local_port, remote_port) = match ip.protocol {
        PROTO_TCP | PROTO_UDP => (lport, rport),
        PROTO_ICMP | PROTO_ICMPV6 => match query_of(ip) {
            // The identifier, the query pair and the direction the request travelled: a
            // request from the peer with the same identifier is a different flow.
            Some((request, pair)) => {
                let origin = if request { dir } else { opposite(dir) };
                (l4.sport, icmp_query_port(pair, origin))
            }
            // Other ICMP is never tracked (the caller does not look it up).
            None => (0, 0),
        },
        _ => (0, 0),
    };
    CtKey {
        ifindex,
        family: ip.family,
        protocol: ip.protocol,
        local_port: local_port.to_be_bytes(),
        remote_port: remote_port.to_be_bytes(),
        _pad: [0; 2],
        local,
        remote,
    }
}

/// The direction a tracked flow was opened in, from its key alone when the key says so.
pub enum Track {
    /// Part of a tracked flow.
    Hit,
    /// No live flow: evaluate policy.
    Miss,
    /// The flow became established but the established table is full.
    Full,
}

/// Applies one packet to a flow entry: counters, last-seen, TCP state, UDP stream.
#[inline(always)]
fn update(e: &mut CtEntry, dir: u8, ip: &Ip, len: u32, now: u64) {
    let from_origin = dir == e.origin;
    e.last_seen_ns = now;
    let d = (dir & 1) as usize;
    // XDP or TC ingress and TC egress run on different CPUs at once and share the entry.
    // Each direction's packets and bytes are written by one direction's program only, so
    // two CPUs collide on them only when one flow's packets of the same direction arrive
    // on two CPUs at once (RSS keeps a flow on one queue). Atomic adds would close that
    // gap, but this toolchain's BPF target offers no atomic read-modify-write to Rust
    // (`AtomicU64::fetch_add` does not exist there): the counters are plain adds, and may
    // lose a count in that case, as Cilium's did before it had atomics. State, flags and
    // last-seen are last-writer-wins, as in netfilter's lockless paths: a packet's update
    // may be overwritten by a concurrent one of the same flow, never by another flow's.
    if let Some(p) = e.packets.get_mut(d) {
        *p += 1;
    }
    if let Some(b) = e.bytes.get_mut(d) {
        *b += len as u64;
    }
    if !from_origin {
        e.flags |= FLAG_SEEN_REPLY;
    }
    match ip.protocol {
        PROTO_TCP => {
            let (state, flags) = tcp_next(e.tcp_state, from_origin, ip.l4.tcp_flags, e.flags);
            e.tcp_state = state;
            e.flags = flags;
        }
        PROTO_UDP => {
            if e.flags & FLAG_SEEN_REPLY != 0 && e.packets[0] + e.packets[1] > 2 {
                e.flags |= FLAG_STREAM;
            }
        }
        _ => {}
    }
}

#[inline(always)]
fn timeout(cfg: &IfaceConfig, e: &CtEntry, protocol: u8) -> u32 {
    let slot = timeout_slot(protocol, e.tcp_state, e.flags);
    cfg.timeouts.get(slot).copied().unwrap_or(0)
}

/// Looks the packet's flow up in both tables and advances it.
#[inline(always)]
pub fn track(key: &CtKey, ip: &Ip, dir: u8, cfg: &IfaceConfig, len: u32, now: u64) -> Track {
    if let Some(p) = SG_CT.get_ptr_mut(key) {
        // SAFETY: the pointer is to a live map value; concurrent writers only race on
        // counters and timestamps, which is accepted (as in Cilium).
        let e = unsafe { &mut *p };
        let stale = is_expired(now, e.last_seen_ns, timeout(cfg, e, ip.protocol))
            || (ip.protocol == PROTO_TCP && tcp_reopens(e.tcp_state, ip.l4.tcp_flags));
        if !stale {
            update(e, dir, ip, len, now);
            return Track::Hit;
        }
        let _ = SG_CT.remove(key);
    }
    if let Some(p) = SG_CT_NEW.get_ptr_mut(key) {
        // SAFETY: as above.
        let e = unsafe { &mut *p };
        let stale = is_expired(now, e.last_seen_ns, timeout(cfg, e, ip.protocol))
            || (ip.protocol == PROTO_TCP && tcp_reopens(e.tcp_state, ip.l4.tcp_flags));
        if stale {
            let _ = SG_CT_NEW.remove(key);
            return Track::Miss;
        }
        update(e, dir, ip, len, now);
        if is_assured(ip.protocol, e.tcp_state, e.flags) {
            // Promotion, safe against the other CPU: the copy is inserted first
            // (BPF_NOEXIST: if another CPU promoted first, its entry stands), so a
            // concurrent lookup always finds the flow in one table or the other. A
            // concurrent packet may still have updated the embryonic entry after our copy:
            // its state and flags are merged into the established entry before the
            // embryonic one goes, so a FIN seen on the other CPU is not lost. The window
            // left (between the merge and the removal) is a few instructions; a packet in
            // it updates an entry about to go and costs at most its own state change,
            // which its peer's next packet repeats.
            match SG_CT.insert(key, &*e, BPF_NOEXIST as u64) {
                Ok(()) | Err(-17) => {
                    if let (Some(new), Some(est)) = (SG_CT_NEW.get_ptr(key), SG_CT.get_ptr_mut(key))
                    {
                        // SAFETY: live map values of plain old data.
                        let (new, est) = unsafe { (&*new, &mut *est) };
                        if new.last_seen_ns > est.last_seen_ns {
                            est.last_seen_ns = new.last_seen_ns;
                            est.tcp_state = new.tcp_state;
                            est.flags |= new.flags;
                        }
                    }
                    let _ = SG_CT_NEW.remove(key);
                }
                Err(_) => return Track::Full,
            }
        }
        return Track::Hit;
    }
    Track::Miss
}

/// Whether a table holds a live (unexpired) flow for `key` (for related ICMP errors).
#[inline(always)]
pub fn exists(key: &CtKey, cfg: &IfaceConfig, now: u64) -> bool {
    let live = |e: &CtEntry| !is_expired(now, e.last_seen_ns, timeout(cfg, e, key.protocol));
    // SAFETY: read-only lookups of plain-old-data values.
    unsafe { SG_CT.get(key).is_some_and(live) || SG_CT_NEW.get(key).is_some_and(live) }
}

/// Opens a flow for an allowed first packet. Insertion is `BPF_NOEXIST`, so XDP and TC on
/// two CPUs cannot clobber each other's entry.
#[inline(always)]
pub fn open(key: &CtKey, ip: &Ip, dir: u8, rule_id: u32, len: u32, now: u64) {
    let mut e = CtEntry {
        last_seen_ns: now,
        created_ns: now,
        packets: [0; 2],
        bytes: [0; 2],
        rule_id,
        origin: dir,
        tcp_state: if ip.protocol == PROTO_TCP {
            tcp_open(ip.l4.tcp_flags)
        } else {
            TCP_NONE
        },
        flags: 0,
        _pad: 0,
    };
    let d = (dir & 1) as usize;
    e.packets[d] = 1;
    e.bytes[d] = len as u64;
    // BPF_NOEXIST: a concurrent packet of the same new flow on the other CPU keeps the
    // first entry. A packet that missed both tables while another CPU promoted the flow
    // (it looked at SG_CT before the insert and at SG_CT_NEW after the removal) would
    // leave a duplicate embryonic entry: it is removed when the flow is established.
    if SG_CT_NEW.insert(key, &e, BPF_NOEXIST as u64).is_ok() {
        // SAFETY: read-only presence check.
        if unsafe { SG_CT.get(key).is_some() } {
            let _ = SG_CT_NEW.remove(key);
        }
    }
}
