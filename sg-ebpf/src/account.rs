//! Counters, per-rule hits and flow events. No logging per packet.

use sg_common::*;

use crate::{
    maps::{SG_COUNTERS_V2, SG_EVENTS_V2, SG_EVENT_RATE, SG_RULE_HITS},
    parse::Ip,
};

/// Counts one packet of `bytes` in a slot of the interface whose counters live at
/// `counters`.
#[inline(always)]
pub fn count(counters: u32, dir: u8, slot: u32, bytes: u32) {
    let idx = Counters::index(dir & 1, slot & 31);
    if let Some(c) = SG_COUNTERS_V2.get_ptr_mut(counters) {
        // SAFETY: per-CPU value, no other writer on this CPU.
        unsafe {
            if let Some(v) = (*c).v.get_mut(idx) {
                *v += 1;
            }
            if let Some(b) = (*c).bytes.get_mut(idx) {
                *b += bytes as u64;
            }
        }
    }
}

/// Counts a flow admitted by `rule_id`; a rule id beyond the hit map is counted as lost.
#[inline(always)]
pub fn rule_hit(counters: u32, dir: u8, rule_id: u32) {
    match SG_RULE_HITS.get_ptr_mut(rule_id) {
        // SAFETY: per-CPU value, no other writer on this CPU.
        Some(p) => unsafe { *p += 1 },
        None => count(counters, dir, counter::RULE_HITS_LOST, 0),
    }
}

/// Emits a flow event; `detail` is the admitting rule or the drop reason. Denied and
/// audited events are rate-limited per CPU (the ones left out are counted, and flow logs
/// report them as SKIPDATA); an event the full ring cannot take is counted as lost.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn event(
    counters: u32,
    kind: u8,
    ifindex: u32,
    dir: u8,
    ip: &Ip,
    detail: u32,
    now: u64,
    deny_rate: u32,
    bytes: u32,
) {
    if kind != EVENT_ADMITTED {
        let Some(r) = SG_EVENT_RATE.get_ptr_mut(0) else {
            return;
        };
        // SAFETY: per-CPU value.
        let r = unsafe { &mut *r };
        if now.wrapping_sub(r.window_start_ns) > 1_000_000_000 {
            r.window_start_ns = now;
            r.count = 0;
        }
        if r.count >= deny_rate {
            count(counters, dir, counter::EVENTS_SUPPRESSED, bytes);
            return;
        }
        r.count += 1;
    }
    let Some(mut slot) = SG_EVENTS_V2.reserve::<FlowEvent>(0) else {
        count(counters, dir, counter::EVENTS_LOST, bytes);
        return;
    };
    let (local, remote, lport, rport) = if dir == DIR_INGRESS {
        (ip.dst, ip.src, ip.l4.dport, ip.l4.sport)
    } else {
        (ip.src, ip.dst, ip.l4.sport, ip.l4.dport)
    };
    // Field by field into the ring: no copy of the event on the stack.
    let e = slot.as_mut_ptr();
    // SAFETY: `e` points at a reserved, exclusively owned ring slot of a `FlowEvent`.
    unsafe {
        (*e).time_ns = now;
        (*e).ifindex = ifindex;
        (*e).detail = detail;
        (*e).kind = kind;
        (*e).direction = dir;
        (*e).family = ip.family;
        (*e).protocol = ip.protocol;
        (*e).local_port = lport.to_be_bytes();
        (*e).remote_port = rport.to_be_bytes();
        (*e).local = local;
        (*e).remote = remote;
        (*e).bytes = bytes;
        (*e).tcp_flags = if ip.protocol == PROTO_TCP {
            ip.l4.tcp_flags
        } else {
            0
        };
        (*e)._pad = [0; 3];
    }
    slot.submit(0);
}
