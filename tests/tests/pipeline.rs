//! The whole pipeline on a real interface: the agent library loads the programs, programs
//! a compiled plan, attaches ingress (XDP native, then TC) and TC egress to a veth inside a
//! namespace the test made, and real traffic is allowed, dropped and counted.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    time::Duration,
};

use sg_agent::{
    compile::LocalInterface,
    datapath::{IngressHook, MapSizes},
    source::parse_str,
};
use sg_common::{counter, drop_reason, DIR_EGRESS, DIR_INGRESS};
use sg_tests::{
    bpf::Bpf,
    netns::{veth, Netns},
    privileges::require_root,
    wait_for,
};

const STATE: &str = r#"
[[security_group]]
id = "sg-server"
ingress = [{ protocol = "tcp", ports = "8080", from = ["198.18.0.0/24", "2001:db8::/64"] }]

[[interface]]
id = "eni-server"
ipv4 = ["198.18.0.1"]
groups = ["sg-server"]
"#;

/// Accepts connections forever on a thread, answering each with "ok".
fn serve(listener: std::net::TcpListener) {
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(b"ok");
        }
    });
}

fn reaches(ns: &Netns, addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().unwrap();
    match ns.tcp_connect(addr, Duration::from_millis(400)) {
        Ok(mut s) => {
            let mut buf = [0u8; 2];
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.read_exact(&mut buf).is_ok() && &buf == b"ok"
        }
        Err(_) => false,
    }
}

fn enforce_and_probe(hook: IngressHook) {
    let server = Netns::new("srv");
    let client = Netns::new("cli");
    veth(
        &server,
        "eth0",
        &["198.18.0.1/24", "2001:db8::1/64"],
        &client,
        "eth0",
        &["198.18.0.2/24", "2001:db8::2/64"],
    );
    let ifindex = server.ifindex("eth0");
    let state = parse_str(STATE).unwrap();
    let mut bpf = Bpf::with_state(
        &state,
        &[LocalInterface {
            ifindex,
            eni: "eni-server".into(),
        }],
        &MapSizes::default(),
    );
    serve(server.tcp_listen("0.0.0.0:8081".parse().unwrap()));
    serve(server.tcp_listen("[::]:8080".parse().unwrap()));
    serve(client.tcp_listen("0.0.0.0:9000".parse().unwrap()));
    // Before enforcement, everything is reachable.
    wait_for("the lab to come up", Duration::from_secs(5), || {
        reaches(&client, "198.18.0.1:8081").then_some(())
    });
    server
        .enter(|| bpf.dp.attach("eth0", ifindex, hook, None))
        .unwrap_or_else(|e| panic!("{hook:?}: attach: {e:?}"));
    // An attach stops the datapath trusting the presence filter (the programs it replaced
    // may never have stamped it) until the filter is refreshed, as the agent does next.
    assert!(
        !bpf.dp.seen_is_on(),
        "{hook:?}: the filter is off after an attach"
    );
    bpf.dp
        .refresh_seen()
        .expect("refreshing the presence filter");
    assert!(bpf.dp.seen_is_on());
    let link =
        String::from_utf8_lossy(&server.ip(&["link", "show", "dev", "eth0"]).stdout).to_string();
    if hook == IngressHook::Xdp {
        assert!(
            link.contains("xdp ") && !link.contains("xdpgeneric"),
            "XDP must run in native (driver) mode: {link}"
        );
    }

    assert!(
        reaches(&client, "198.18.0.1:8080"),
        "{hook:?}: allowed port"
    );
    assert!(
        reaches(&client, "[2001:db8::1]:8080"),
        "{hook:?}: allowed port over IPv6"
    );
    assert!(
        !reaches(&client, "198.18.0.1:8081"),
        "{hook:?}: port without a rule"
    );
    assert!(
        !client.ping("198.18.0.1", 56, 1),
        "{hook:?}: ping without a rule"
    );
    assert!(
        server.ping("198.18.0.2", 56, 2),
        "{hook:?}: outbound ping and its tracked reply"
    );
    assert!(
        reaches(&server, "198.18.0.2:9000"),
        "{hook:?}: outbound connection and its tracked replies"
    );

    let new_in = bpf.counter(ifindex, DIR_INGRESS, counter::ALLOWED_NEW);
    let tracked_in = bpf.counter(ifindex, DIR_INGRESS, counter::ALLOWED_TRACKED);
    let denied_in = bpf.counter(
        ifindex,
        DIR_INGRESS,
        counter::drop_slot(drop_reason::POLICY),
    );
    let new_out = bpf.counter(ifindex, DIR_EGRESS, counter::ALLOWED_NEW);
    eprintln!("{hook:?}: ingress new {new_in} tracked {tracked_in} denied {denied_in}; egress new {new_out}");
    assert!(
        new_in >= 2,
        "{hook:?}: new flows admitted on ingress counted"
    );
    assert!(tracked_in >= 4, "{hook:?}: tracked packets counted");
    assert!(denied_in >= 2, "{hook:?}: denied packets counted");
    assert!(new_out >= 2, "{hook:?}: outbound flows counted");
}

#[test]
fn xdp_native_ingress_and_tc_egress_enforce_real_traffic() {
    if !require_root("xdp_native_ingress_and_tc_egress_enforce_real_traffic") {
        return;
    }
    enforce_and_probe(IngressHook::Xdp);
}

#[test]
fn tc_ingress_and_tc_egress_enforce_real_traffic() {
    if !require_root("tc_ingress_and_tc_egress_enforce_real_traffic") {
        return;
    }
    enforce_and_probe(IngressHook::Tc);
}
