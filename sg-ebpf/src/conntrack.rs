//! Connection tracking. Both directions of a flow build the same key ("local" is the
//! enforced interface's side), so one lookup per table finds a flow whichever way the
//! packet goes. New flows live in the LRU table `SG_CT_NEW` until they are assured (reply
//! seen; TCP established), then move to `SG_CT`, which new flows can never evict: a flood
//! of new flows churns only the embryonic table (netfilter's early-drop idea).

use aya_ebpf::bindings::BPF_NOEXIST;
use sg_common::{ct::*, *};

use crate::{
    // The tables of this layout (`_V2`: with sequence tracking).
    maps::{
        SG_CT_NEW_V2 as SG_CT_NEW, SG_CT_SEEN, SG_CT_SLOTS, SG_CT_V2 as SG_CT, SG_GLOBAL, SG_IFACE,
    },
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
    /// A RST whose sequence number is not plausible for its flow (SPEC §1.11): dropped,
    /// the flow unchanged.
    OutOfWindow,
}

/// What the sequence checks need of a TCP packet.
#[inline(always)]
fn segment(ip: &Ip) -> Segment {
    Segment {
        flags: ip.l4.tcp_flags,
        seq: ip.l4.tcp_seq,
        ack: ip.l4.tcp_ack,
        win: ip.l4.tcp_win,
        len: ip.l4.tcp_len,
    }
}

/// Applies one packet to a flow entry: counters, last-seen, TCP state and sequence
/// numbers, UDP stream. False (nothing changed) for a RST out of the flow's window.
#[inline(always)]
fn update(e: &mut CtEntry, dir: u8, ip: &Ip, now: u64) -> bool {
    let len = ip.len;
    let from_origin = dir == e.origin;
    // A RST or FIN changes the flow only with a plausible sequence number, so a blind
    // forged one cannot end it: such a RST is dropped; such a FIN passes (a
    // retransmission of an acknowledged FIN is one) but closes nothing.
    let mut tcp_flags = ip.l4.tcp_flags;
    if ip.protocol == PROTO_TCP && tcp_flags & (TH_RST | TH_FIN) != 0 {
        let seg = segment(ip);
        if !tcp_seq_plausible(e, dir, &seg) {
            if tcp_flags & TH_RST != 0 {
                return false;
            }
            tcp_flags &= !TH_FIN;
        }
    }
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
            let mut seg = segment(ip);
            seg.flags = tcp_flags;
            tcp_record(e, dir, &seg);
            let (state, flags) = tcp_next(e.tcp_state, from_origin, tcp_flags, e.flags);
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
    true
}

#[inline(always)]
fn timeout(cfg: &IfaceConfig, e: &CtEntry, protocol: u8) -> u32 {
    let slot = timeout_slot(protocol, e.tcp_state, e.flags);
    cfg.timeouts.get(slot).copied().unwrap_or(0)
}

/// The presence filter's header: its epoch, whether it is on, and its slot mask.
#[inline(always)]
fn seen_header() -> Option<(u8, bool, u32)> {
    let h = SG_CT_SEEN.get(0)?;
    let mask = u32::from_le_bytes([
        h[SEEN_MASK],
        h[SEEN_MASK + 1],
        h[SEEN_MASK + 2],
        h[SEEN_MASK + 3],
    ]);
    Some((h[SEEN_EPOCH], h[SEEN_ON] != 0, mask))
}

/// False only when the presence filter proves that neither table holds `key`'s flow
/// (`sg_common::ct::SEEN_CHUNK`); true whenever it cannot tell.
#[inline(always)]
fn may_be_tracked(key: &CtKey) -> bool {
    let Some((epoch, true, mask)) = seen_header() else {
        return true;
    };
    let (chunk, byte) = seen_place(key, mask);
    match SG_CT_SEEN.get(chunk).and_then(|c| c.get(byte)) {
        Some(&stamp) => seen_admits(stamp, epoch),
        None => true,
    }
}

/// Stamps `key`'s slot of the presence filter with the current epoch; called before the
/// flow goes into either table, so the filter never denies a flow a table holds.
#[inline(always)]
fn mark_tracked(key: &CtKey) {
    let Some((epoch, _, mask)) = seen_header() else {
        return;
    };
    if epoch == 0 {
        return;
    }
    let (chunk, byte) = seen_place(key, mask);
    if let Some(c) = SG_CT_SEEN.get_ptr_mut(chunk) {
        // SAFETY: a live map value of plain bytes; a byte store, so CPUs stamping slots of
        // one chunk at once never undo each other's.
        unsafe {
            if let Some(b) = (*c).get_mut(byte) {
                if *b != epoch {
                    core::ptr::write_volatile(b, epoch);
                }
            }
        }
    }
}

/// Looks the packet's flow up in both tables and advances it.
#[inline(always)]
pub fn track(key: &CtKey, ip: &Ip, dir: u8, cfg: &IfaceConfig, now: u64) -> Track {
    // A TCP segment without SYN nearly always belongs to a flow: it goes to the tables
    // without asking the filter, so established traffic pays nothing for it. Everything
    // that may open a flow (a SYN, UDP, ICMP), a flood's packets among them, asks first.
    let established_kind = ip.protocol == PROTO_TCP && ip.l4.tcp_flags & TH_SYN == 0;
    if !established_kind && !may_be_tracked(key) {
        return Track::Miss;
    }
    if let Some(p) = SG_CT.get_ptr_mut(key) {
        // SAFETY: the pointer is to a live map value; concurrent writers only race on
        // counters and timestamps, which is accepted (as in Cilium).
        let e = unsafe { &mut *p };
        let stale = is_expired(now, e.last_seen_ns, timeout(cfg, e, ip.protocol))
            || (ip.protocol == PROTO_TCP && tcp_reopens(e.tcp_state, ip.l4.tcp_flags));
        if !stale {
            if !update(e, dir, ip, now) {
                return Track::OutOfWindow;
            }
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
        if !update(e, dir, ip, now) {
            return Track::OutOfWindow;
        }
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
            match promote(key, e, cfg, now) {
                0 | -17 => {
                    if let (Some(new), Some(est)) = (SG_CT_NEW.get_ptr(key), SG_CT.get_ptr_mut(key))
                    {
                        // SAFETY: live map values of plain old data.
                        let (new, est) = unsafe { (&*new, &mut *est) };
                        if new.last_seen_ns > est.last_seen_ns {
                            est.last_seen_ns = new.last_seen_ns;
                            est.tcp_state = new.tcp_state;
                            est.flags |= new.flags;
                            est.tcp = new.tcp;
                        }
                    }
                    let _ = SG_CT_NEW.remove(key);
                }
                // No slot of the index among its probes: it stays embryonic (tracked,
                // only not protected) and tries again with its next packet.
                -28 => {}
                _ => return Track::Full,
            }
        }
        return Track::Hit;
    }
    Track::Miss
}

/// Inserts an assured flow into the established table with a slot of its index (the
/// same `BPF_NOEXIST` semantics: -17 when another CPU promoted it first). A full table
/// is swept for expired flows first, so expired flows never block new ones, whether or
/// not the agent runs (SPEC §1.11). A flow with no free slot among its probes stays
/// embryonic (it is still tracked there, only not protected): every established flow
/// has a slot, so the sweep can find every one of them. Runs once per flow (its
/// promotion), never on the hot path of an established flow.
#[inline(always)]
fn promote(key: &CtKey, e: &CtEntry, cfg: &IfaceConfig, now: u64) -> i32 {
    // A plain code, not a `Result`: a BPF-to-BPF call returns in one register.
    let code = |r: Result<(), i32>| r.err().unwrap_or(0);
    let slots = SG_GLOBAL.get(0).map_or(0, |g| g.ct_slots);
    mark_tracked(key);
    if slots == 0 {
        return code(SG_CT.insert(key, e, BPF_NOEXIST as u64));
    }
    let Some(slot) = free_slot(key, slots, cfg, now) else {
        return -28;
    };
    sweep::<SLOT_SWEEP_EACH>(slots, key.ifindex, cfg, now);
    let mut result = code(SG_CT.insert(key, e, BPF_NOEXIST as u64));
    if result == -7 {
        // E2BIG: full. Reclaim the expired flows of a longer stretch, then retry.
        sweep::<SLOT_SWEEP>(slots, key.ifindex, cfg, now);
        result = code(SG_CT.insert(key, e, BPF_NOEXIST as u64));
    }
    if result == 0 {
        if let Some(p) = SG_CT_SLOTS.get_ptr_mut(slot) {
            // SAFETY: a live map value of plain old data.
            unsafe { *p = *key };
        }
    }
    result
}

/// Whether the established flow a slot names is gone or expired (removing it if
/// expired): either way the slot is free to reuse. `cfg` is the configuration of
/// interface `ifindex`; a slot naming another interface's flow uses that one's.
#[inline(always)]
fn reclaim(k: &CtKey, ifindex: u32, cfg: &IfaceConfig, now: u64) -> bool {
    if k.ifindex == 0 {
        return true;
    }
    // SAFETY: read-only lookups of plain-old-data values.
    let Some(e) = (unsafe { SG_CT.get(k) }) else {
        return true;
    };
    let cfg = if k.ifindex == ifindex {
        cfg
    } else {
        match unsafe { SG_IFACE.get(&k.ifindex) } {
            Some(c) => c,
            // Not an enforced interface any more: the agent's GC removes its flows.
            None => return false,
        }
    };
    if is_expired(now, e.last_seen_ns, timeout(cfg, e, k.protocol)) {
        let _ = SG_CT.remove(k);
        return true;
    }
    false
}

/// A slot for `key` among its probes: empty, naming a flow that is gone, or naming an
/// expired flow (which is removed).
#[inline(always)]
fn free_slot(key: &CtKey, slots: u32, cfg: &IfaceConfig, now: u64) -> Option<u32> {
    let start = ct_slot_of(key, slots);
    for i in 0..SLOT_PROBES {
        let slot = (start + i) % slots;
        let k = SG_CT_SLOTS.get(slot)?;
        if *k == *key || reclaim(k, key.ifindex, cfg, now) {
            return Some(slot);
        }
    }
    None
}

/// Looks at `N` slots of the index from the sweep cursor on, removing expired flows, and
/// moves the cursor past them: the datapath's own garbage collection, a few slots per
/// promotion and more when the table is full, so it goes round the whole index whether or
/// not the agent runs. The cursor is the index's last element (its `ifindex`); CPUs
/// racing on it sweep a stretch twice, which is harmless.
#[inline(always)]
fn sweep<const N: u32>(slots: u32, ifindex: u32, cfg: &IfaceConfig, now: u64) {
    let Some(cursor) = SG_CT_SLOTS.get_ptr_mut(slots) else {
        return;
    };
    // SAFETY: a live map value of plain old data.
    let at = unsafe { (*cursor).ifindex } % slots;
    for i in 0..N {
        if let Some(k) = SG_CT_SLOTS.get((at + i) % slots) {
            let _ = reclaim(k, ifindex, cfg, now);
        }
    }
    // SAFETY: as above.
    unsafe { (*cursor).ifindex = (at + N) % slots };
}

/// Whether a table holds a live (unexpired) flow for `key` (for related ICMP errors).
#[inline(always)]
pub fn exists(key: &CtKey, cfg: &IfaceConfig, now: u64) -> bool {
    let live = |e: &CtEntry| !is_expired(now, e.last_seen_ns, timeout(cfg, e, key.protocol));
    // SAFETY: read-only lookups of plain-old-data values.
    unsafe { SG_CT.get(key).is_some_and(live) || SG_CT_NEW.get(key).is_some_and(live) }
}

/// What opens a flow besides the packet: its direction, the admitting rule and the time
/// (one argument: a BPF-to-BPF call takes at most five).
pub struct Opening {
    pub dir: u8,
    pub rule_id: u32,
    pub now: u64,
}

/// Opens a flow for an allowed first packet. Insertion is `BPF_NOEXIST`, so XDP and TC on
/// two CPUs cannot clobber each other's entry. A function of its own (a BPF-to-BPF call):
/// the new entry's frame is on the stack only while it is built, not beside the whole
/// policy path's.
#[inline(never)]
pub fn open(key: &CtKey, ip: &Ip, opening: &Opening) {
    let (dir, rule_id, now) = (opening.dir, opening.rule_id, opening.now);
    let len = ip.len;
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
        tcp: if ip.protocol == PROTO_TCP {
            tcp_open_sides(dir, &segment(ip))
        } else {
            [TcpSide::default(); 2]
        },
    };
    let d = (dir & 1) as usize;
    e.packets[d] = 1;
    e.bytes[d] = len as u64;
    // BPF_NOEXIST: a concurrent packet of the same new flow on the other CPU keeps the
    // first entry. A packet that missed both tables while another CPU promoted the flow
    // (it looked at SG_CT before the insert and at SG_CT_NEW after the removal) would
    // leave a duplicate embryonic entry: it is removed when the flow is established.
    mark_tracked(key);
    if SG_CT_NEW.insert(key, &e, BPF_NOEXIST as u64).is_ok() {
        // SAFETY: read-only presence check.
        if unsafe { SG_CT.get(key).is_some() } {
            let _ = SG_CT_NEW.remove(key);
        }
    }
}
