//! Counters, per-rule hits and flow events. No logging per packet.

use sg_common::*;

use crate::{
    maps::{SG_COUNTERS, SG_EVENTS, SG_EVENT_RATE, SG_RULE_HITS},
    parse::Ip,
};

/// Adds one to a counter of the interface whose counters live at `counters`.
#[inline(always)]
pub fn count(counters: u32, dir: u8, slot: u32) {
    let idx = Counters::index(dir & 1, slot & 31);
    if let Some(c) = SG_COUNTERS.get_ptr_mut(counters) {
        // SAFETY: per-CPU value, no other writer on this CPU.
        if let Some(v) = unsafe { (*c).v.get_mut(idx) } {
            *v += 1;
        }
    }
}

/// Counts a flow admitted by `rule_id`; a rule id beyond the hit map is counted as lost.
#[inline(always)]
pub fn rule_hit(counters: u32, dir: u8, rule_id: u32) {
    match SG_RULE_HITS.get_ptr_mut(rule_id) {
        // SAFETY: per-CPU value, no other writer on this CPU.
        Some(p) => unsafe { *p += 1 },
        None => count(counters, dir, counter::RULE_HITS_LOST),
    }
}

/// Emits a flow event. Denied events are rate-limited per CPU; an event the full ring
/// cannot take is counted as lost (flow logs report it as SKIPDATA).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn event(
    counters: u32,
    kind: u8,
    ifindex: u32,
    dir: u8,
    ip: &Ip,
    rule_id: u32,
    now: u64,
    deny_rate: u32,
) {
    if kind == EVENT_DENIED {
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
            return;
        }
        r.count += 1;
    }
    let Some(mut slot) = SG_EVENTS.reserve::<FlowEvent>(0) else {
        count(counters, dir, counter::EVENTS_LOST);
        return;
    };
    let (local, remote, lport, rport) = if dir == DIR_INGRESS {
        (ip.dst, ip.src, ip.l4.dport, ip.l4.sport)
    } else {
        (ip.src, ip.dst, ip.l4.sport, ip.l4.dport)
    };
    slot.write(FlowEvent {
        time_ns: now,
        ifindex,
        rule_id,
        kind,
        direction: dir,
        family: ip.family,
        protocol: ip.protocol,
        local_port: lport.to_be_bytes(),
        remote_port: rport.to_be_bytes(),
        local,
        remote,
    });
    slot.submit(0);
}
