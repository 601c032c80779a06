//! Fail-closed parsing (SPEC §2) in the kernel programs: every malformed frame is
//! dropped with its own drop reason; fragments follow their first fragment.

use sg_common::{counter, drop_reason, DIR_INGRESS};
use sg_tests::fixtures::{main_bpf, ME4, ME6};
use sg_tests::{
    bpf::{Bpf, Hook, Outcome, LO},
    packet::{icmp, tcp, udp, Spec, L4, TH_SYN},
    privileges::require_root,
};

/// Names a drop reason for messages.
fn reason(code: u32) -> &'static str {
    drop_reason::NAMES[code as usize]
}

#[test]
fn malformed_frames_are_dropped_with_their_own_reason() {
    if !require_root("malformed_frames_are_dropped_with_their_own_reason") {
        return;
    }
    let mut bpf = main_bpf();
    let mut ran = 0;
    let mut expect = |bpf: &mut Bpf, hook: Hook, frame: &[u8], want: Outcome, what: &str| {
        bpf.dp.flush_flows().unwrap();
        let got = bpf
            .outcome(hook, frame)
            .unwrap_or_else(|e| panic!("{hook:?}: {what}: {e:?}"));
        let show = |o: Outcome| match o {
            Outcome::Pass => "pass".to_string(),
            Outcome::Drop(r) => format!("drop ({})", reason(r)),
        };
        assert_eq!(
            got,
            want,
            "{hook:?}: {what}: got {}, want {}",
            show(got),
            show(want)
        );
        ran += 1;
    };
    use drop_reason::*;
    for hook in [Hook::Xdp, Hook::TcIngress] {
        // Truncation at every byte offset (BPF_PROG_TEST_RUN needs a whole Ethernet header):
        // a cut IP header is truncated_ip; past it, the IP length no longer fits the frame.
        for good in [
            tcp("198.18.10.5", ME4, 40000, 22, TH_SYN),
            tcp("2001:db8:1:10::5", ME6, 40000, 22, TH_SYN),
            udp("198.18.1.1", ME4, 40000, 5001),
            icmp("198.18.1.1", ME4, 8, 0, 1),
        ] {
            let frame = good.build();
            expect(&mut bpf, hook, &frame, Outcome::Pass, "the whole frame");
            let ip_header = 14 + if good.src.is_ipv6() { 40 } else { 20 };
            for len in 14..frame.len() {
                // The skb test run refuses frames whose IP header is cut (XDP covers them).
                if hook != Hook::Xdp && len < ip_header {
                    assert!(bpf.try_run_raw(hook, LO, &frame[..len], 1).is_err());
                    continue;
                }
                let want = if len < ip_header {
                    TRUNCATED_IP
                } else {
                    BAD_LENGTH
                };
                expect(
                    &mut bpf,
                    hook,
                    &frame[..len],
                    Outcome::Drop(want),
                    &format!("{:?} truncated to {len} bytes", good.l4),
                );
            }
        }
        // IHL 0–15: below 5 is malformed; 5–15 with the options present is fine.
        for ihl in 0u8..=15 {
            let mut s = tcp("198.18.10.5", ME4, 40000, 22, TH_SYN);
            s.ipv4_options = (ihl.max(5) as usize - 5) * 4;
            let mut frame = s.build();
            frame[14] = 0x40 | ihl;
            let want = if ihl >= 5 {
                Outcome::Pass
            } else {
                Outcome::Drop(BAD_IHL)
            };
            expect(&mut bpf, hook, &frame, want, &format!("IHL {ihl}"));
        }
        let frame = tcp("198.18.10.5", ME4, 40000, 22, TH_SYN).build();
        // IHL larger than the header actually present.
        let mut f = frame.clone();
        f[14] = 0x4f;
        expect(
            &mut bpf,
            hook,
            &f,
            Outcome::Drop(BAD_LENGTH),
            "IHL beyond total length",
        );
        // Total length beyond the frame, and below the header.
        for total in [41u16, 100, 1500, 65535, 19, 0] {
            let mut f = frame.clone();
            f[16..18].copy_from_slice(&total.to_be_bytes());
            expect(
                &mut bpf,
                hook,
                &f,
                Outcome::Drop(BAD_LENGTH),
                &format!("total length {total}"),
            );
        }
        // Ethernet padding after a short total length is legal.
        let mut padded = frame.clone();
        padded.extend_from_slice(&[0; 6]);
        expect(
            &mut bpf,
            hook,
            &padded,
            Outcome::Pass,
            "trailing Ethernet padding",
        );
        // IPv6 payload length beyond the frame.
        let mut f6 = tcp("2001:db8:1:10::5", ME6, 40000, 22, TH_SYN).build();
        f6[18..20].copy_from_slice(&200u16.to_be_bytes());
        expect(
            &mut bpf,
            hook,
            &f6,
            Outcome::Drop(BAD_LENGTH),
            "IPv6 payload length beyond the frame",
        );
        // Wrong IP version in the header.
        let mut bad = frame.clone();
        bad[14] = 0x65;
        expect(
            &mut bpf,
            hook,
            &bad,
            Outcome::Drop(BAD_IP_VERSION),
            "version 6 in an IPv4 frame",
        );
        // TCP data offset below 5.
        let mut off = frame.clone();
        off[14 + 20 + 12] = 0x40;
        expect(
            &mut bpf,
            hook,
            &off,
            Outcome::Drop(TRUNCATED_L4),
            "TCP data offset 4",
        );
    }
    eprintln!("malformed corpus: {ran} cases, each with its drop reason");
}

#[test]
fn fragments_follow_their_first_fragment() {
    if !require_root("fragments_follow_their_first_fragment") {
        return;
    }
    for hook in Hook::INGRESS {
        let mut bpf = main_bpf();
        for (src, dst, denied_src, id) in [
            ("198.18.10.5", ME4, "198.18.11.5", 0x100u32),
            ("2001:db8:1:10::5", ME6, "2001:db8:1:11::5", 0x200),
        ] {
            let mut first = tcp(src, dst, 40000, 22, TH_SYN);
            first.payload = 64;
            first.fragment = Some((id, 0, true));
            assert!(
                bpf.run(hook, &first.build()),
                "{hook:?} {src}: first fragment"
            );
            let mut later = Spec::new(
                src,
                dst,
                L4::FragmentData {
                    protocol: 6,
                    len: 64,
                },
            );
            later.fragment = Some((id, 88, true));
            assert!(
                bpf.run(hook, &later.build()),
                "{hook:?} {src}: middle fragment"
            );
            later.fragment = Some((id, 176, false));
            assert!(
                bpf.run(hook, &later.build()),
                "{hook:?} {src}: last fragment"
            );
            // The denied datagram's later fragments are dropped with it.
            let mut first = tcp(denied_src, dst, 40000, 22, TH_SYN);
            first.fragment = Some((id + 1, 0, true));
            assert!(
                !bpf.run(hook, &first.build()),
                "{hook:?} {denied_src}: denied first fragment"
            );
            let mut later = Spec::new(
                denied_src,
                dst,
                L4::FragmentData {
                    protocol: 6,
                    len: 64,
                },
            );
            later.fragment = Some((id + 1, 88, false));
            assert!(
                !bpf.run(hook, &later.build()),
                "{hook:?}: fragment of a denied datagram"
            );
            // An orphan non-first fragment is dropped.
            let mut orphan = Spec::new(
                src,
                dst,
                L4::FragmentData {
                    protocol: 6,
                    len: 64,
                },
            );
            orphan.fragment = Some((id + 2, 88, false));
            assert!(
                !bpf.run(hook, &orphan.build()),
                "{hook:?} {src}: orphan fragment"
            );
        }
        // Orphans: the two unknown datagrams' fragments, and those of the two denied
        // datagrams (a denied first fragment is not remembered, SPEC §2).
        assert_eq!(
            bpf.counter(
                LO,
                DIR_INGRESS,
                counter::drop_slot(drop_reason::FRAGMENT_ORPHAN)
            ),
            4
        );
        assert_eq!(bpf.counter(LO, DIR_INGRESS, counter::ALLOWED_FRAGMENT), 4);
    }
}

/// A later fragment of `src → dst`, datagram `id`, at byte `offset`.
fn later_fragment(src: &str, dst: &str, id: u32, offset: u16) -> Spec {
    let mut s = Spec::new(
        src,
        dst,
        L4::FragmentData {
            protocol: 6,
            len: 64,
        },
    );
    s.fragment = Some((id, offset, false));
    s
}

#[test]
fn fragment_verdicts_are_bounded_in_direction_time_and_parsing() {
    if !require_root("fragment_verdicts_are_bounded_in_direction_time_and_parsing") {
        return;
    }
    use drop_reason::*;
    for hook in Hook::INGRESS {
        let mut bpf = main_bpf();
        let mut first = tcp("198.18.10.5", ME4, 40000, 22, TH_SYN);
        first.payload = 64;
        first.fragment = Some((0x300, 0, true));
        assert!(bpf.run(hook, &first.build()));
        // The verdict is for ingress: the same datagram id on egress finds nothing.
        let out = later_fragment("198.18.10.5", ME4, 0x300, 88).build();
        assert_eq!(
            bpf.outcome(Hook::TcEgress, &out).unwrap(),
            Outcome::Drop(FRAGMENT_ORPHAN),
            "{hook:?}: the other direction"
        );
        // Within the reassembly timeout it is followed; after it, not.
        let inside = later_fragment("198.18.10.5", ME4, 0x300, 88).build();
        assert!(bpf.run(hook, &inside), "{hook:?}: within the timeout");
        bpf.advance_clock(31);
        assert_eq!(
            bpf.outcome(hook, &inside).unwrap(),
            Outcome::Drop(FRAGMENT_ORPHAN),
            "{hook:?}: after the reassembly timeout"
        );
        // A first fragment too short for the whole TCP header (RFC 1858): the header
        // would be read past the IP length.
        let mut tiny = tcp("198.18.10.5", ME4, 40000, 22, TH_SYN);
        tiny.fragment = Some((0x301, 0, true));
        let mut frame = tiny.build();
        let total = (20 + 8u16).to_be_bytes();
        frame[16..18].copy_from_slice(&total);
        sg_tests::packet::fix_ipv4_checksums(&mut frame);
        assert_eq!(
            bpf.outcome(hook, &frame).unwrap(),
            Outcome::Drop(TRUNCATED_L4),
            "{hook:?}: tiny first fragment"
        );
        // A TCP header in trailing bytes past the IP length opens nothing.
        let mut trailing = tcp("198.18.10.5", ME4, 40001, 22, TH_SYN).build();
        trailing[16..18].copy_from_slice(&20u16.to_be_bytes());
        sg_tests::packet::fix_ipv4_checksums(&mut trailing);
        assert_eq!(
            bpf.outcome(hook, &trailing).unwrap(),
            Outcome::Drop(TRUNCATED_L4),
            "{hook:?}: L4 header past the IP length"
        );
        // IPv6: a second fragment header is dropped.
        let mut twice = tcp("2001:db8:1:10::5", ME6, 40000, 22, TH_SYN);
        twice.ipv6_ext = vec![44];
        twice.fragment = Some((0x302, 0, true));
        let mut frame = twice.build();
        // Make the first (builder's generic) header a real first-fragment header.
        frame[54 + 2] = 0;
        frame[54 + 3] = 1;
        assert_eq!(
            bpf.outcome(hook, &frame).unwrap(),
            Outcome::Drop(FRAGMENT_HEADER_TWICE),
            "{hook:?}: two fragment headers"
        );
        // A later fragment whose payload looks like extension headers is not walked.
        let mut v6first = tcp("2001:db8:1:10::5", ME6, 40000, 22, TH_SYN);
        v6first.payload = 64;
        v6first.fragment = Some((0x303, 0, true));
        assert!(bpf.run(hook, &v6first.build()));
        let mut later = Spec::new(
            "2001:db8:1:10::5",
            ME6,
            L4::FragmentData {
                protocol: 60,
                len: 64,
            },
        );
        later.fragment = Some((0x303, 88, false));
        assert!(
            bpf.run(hook, &later.build()),
            "{hook:?}: a later fragment's payload is never parsed as headers"
        );
    }
}
