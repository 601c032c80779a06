//! Differential test of the kernel programs: random states and random packets through
//! BPF_PROG_TEST_RUN on maps filled from the compiled plan (through the ordered diff from
//! the previous state, so the diff is exercised on real maps too); the kernel's verdict
//! must equal the reference evaluator's. Reproduce a failure with SG_SEED=<seed>.

use sg_agent::{
    compile::{LocalInterface, Options},
    datapath::MapSizes,
    eval::evaluate,
    model::Direction,
    testgen::{self, Rng},
};
use sg_tests::{
    bpf::{Bpf, Hook, LO},
    packet::{tcp, udp, Spec, L4, TH_SYN},
    privileges::require_root,
};

const STATES: u64 = 500;
const PACKETS_PER_STATE: usize = 12;

#[test]
fn kernel_verdicts_equal_the_reference_evaluator() {
    if !require_root("kernel_verdicts_equal_the_reference_evaluator") {
        return;
    }
    let base: u64 = sg_tests::seed();
    eprintln!("differential: base seed {base} (SG_SEED={base} reproduces)");
    let sizes = MapSizes {
        conntrack: 1024,
        conntrack_new: 1024,
        addresses: 4096,
        networks: 4096,
        ports: 8192,
        interfaces: 8,
        rules: 1024,
        fragments: 64,
    };
    let mut bpf = Bpf::load(&sizes);
    let mut cases = 0;
    for i in 0..STATES {
        let seed = base.wrapping_add(i);
        let mut rng = Rng::new(seed);
        let state = testgen::state(&mut rng, 1);
        let eni = state.network_interfaces[0].id.clone();
        let locals = [LocalInterface {
            ifindex: LO,
            eni: eni.clone(),
        }];
        bpf.program(&state, &locals, &Options::default());
        for _ in 0..PACKETS_PER_STATE {
            let pkt = testgen::packet(&mut rng);
            let (me, remote) = match pkt.remote {
                std::net::IpAddr::V4(_) => ("198.18.255.1".to_string(), pkt.remote.to_string()),
                std::net::IpAddr::V6(_) => ("2001:db8:ff::1".to_string(), pkt.remote.to_string()),
            };
            let (src, dst) = match pkt.direction {
                Direction::Ingress => (remote.as_str(), me.as_str()),
                Direction::Egress => (me.as_str(), remote.as_str()),
            };
            let spec: Spec = match pkt.protocol {
                6 => tcp(src, dst, 40000, pkt.port, TH_SYN),
                17 => udp(src, dst, 40000, pkt.port),
                // ICMP-shaped (type, code, checksum, identifier, sequence) under the
                // generated protocol number, whichever the address family.
                1 | 58 => Spec::new(
                    src,
                    dst,
                    L4::Raw {
                        protocol: pkt.protocol,
                        bytes: vec![(pkt.port >> 8) as u8, pkt.port as u8, 0, 0, 0, 9, 0, 1],
                    },
                ),
                p => Spec::new(
                    src,
                    dst,
                    L4::Other {
                        protocol: p,
                        len: 16,
                    },
                ),
            };
            let hook = match pkt.direction {
                Direction::Egress => Hook::TcEgress,
                Direction::Ingress if rng.chance(50) => Hook::Xdp,
                Direction::Ingress => Hook::TcIngress,
            };
            bpf.dp.flush_flows().unwrap();
            let got = bpf.run(hook, &spec.build());
            let want = evaluate(&state, &eni, &pkt, false).allows();
            assert_eq!(got, want, "seed {seed}: {pkt:?} via {hook:?}: kernel {got}, reference {want}\nstate: {state:#?}");
            cases += 1;
        }
    }
    eprintln!("differential: {cases} packets over {STATES} states agree");
    assert!(cases >= 1000);
}
