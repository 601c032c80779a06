//! Strict conntrack with real traffic (SPEC §1.11): real agents, real sockets, both
//! families. Untracked flows' replies open nothing, so removing the rule cuts them at
//! once; refused connections and pings never reach the protected table.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use sg_tests::{
    lab::{tcp, write_state, Host, Lab, TempDir, DB_MAC},
    privileges::require_root,
    wait_for,
};

/// The database open to the world on TCP 3306 and UDP 5353 (untracked: egress allows all
/// to anywhere), with an admin-only SSH rule.
fn open_state(with_rules: bool) -> String {
    let rules = if with_rules {
        r#"  { protocol = "tcp", ports = "3306", from = ["0.0.0.0/0", "::/0"] },
  { protocol = "udp", ports = "5353", from = ["0.0.0.0/0", "::/0"] },
"#
    } else {
        ""
    };
    format!(
        r#"[[security_group]]
id = "sg-db"
ingress = [
{rules}  {{ protocol = "tcp", ports = "22", from = ["198.18.100.0/24"] }},
]

[[interface]]
id = "eni-db"
mac = "{DB_MAC}"
ipv4 = ["198.18.2.21"]
ipv6 = ["2001:db8:2::21"]
groups = ["sg-db"]
"#
    )
}

/// Flows the agent's pins hold, as `sg-agent flows --json` prints them.
fn flows(host: &Host) -> Vec<serde_json::Value> {
    let out = host
        .cmd(sg_tests::lab::agent_bin())
        .args(["flows", "--json"])
        .output()
        .expect("sg-agent flows");
    serde_json::from_slice(&out.stdout).expect("flows JSON")
}

/// A UDP echo server on `addr` inside the host (on a thread, forever).
fn udp_echo(host: &Host, addr: &str) {
    let sock = host.ns.udp_bind(addr.parse().unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
}

/// One UDP request from `client` to `to`; whether the echo came back.
fn udp_round_trip(client: &Host, to: &str) -> bool {
    let to: SocketAddr = to.parse().unwrap();
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .unwrap();
    client.ns.enter(|| {
        let s = UdpSocket::bind(any).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let _ = s.send_to(b"hello", to);
        let mut buf = [0u8; 16];
        s.recv_from(&mut buf).is_ok()
    })
}

#[test]
fn untracked_flows_open_nothing_and_are_cut_when_their_rule_goes() {
    if !require_root("untracked_flows_open_nothing_and_are_cut_when_their_rule_goes") {
        return;
    }
    let t = Lab::two_tier();
    udp_echo(&t.db, "[::]:5353");
    let dir = TempDir::new("untracked-ns");
    let state = dir.path("state.toml");
    let sha = write_state(&state, &open_state(true));
    let mut agent = t.db.start_agent(&state, &[], &dir.path("agent.log"));
    t.db.wait_applied(&sha, &mut agent);
    let mut streams = Vec::new();
    for to in ["198.18.2.21:3306", "[2001:db8:2::21]:3306"] {
        let mut s = tcp::connect(&t.outsider.ns, to, None, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{to}: {e}"));
        assert!(tcp::echo_ok(&mut s), "{to}: echo");
        streams.push((to, s));
    }
    for to in ["198.18.2.21:5353", "[2001:db8:2::21]:5353"] {
        assert!(udp_round_trip(&t.outsider, to), "{to}: udp echo");
    }
    // Neither the handshakes' replies nor the UDP replies opened a flow.
    let open: Vec<_> = flows(&t.db)
        .into_iter()
        .filter(|f| matches!(f["local_port"].as_u64(), Some(3306 | 5353)))
        .collect();
    assert!(open.is_empty(), "untracked flows were tracked: {open:#?}");
    // The rule goes: the next packet of each connection is judged by the new rules.
    let sha = write_state(&state, &open_state(false));
    t.db.wait_applied(&sha, &mut agent);
    for (to, s) in &mut streams {
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        assert!(
            !tcp::echo_ok(s),
            "{to}: the untracked connection was not cut"
        );
    }
    for to in ["198.18.2.21:5353", "[2001:db8:2::21]:5353"] {
        assert!(
            !udp_round_trip(&t.outsider, to),
            "{to}: udp after the rule went"
        );
    }
    // A tracked flow (opened outbound by the database) is unaffected by the change.
    let mut out = tcp::connect(&t.db.ns, "198.18.200.1:7777", None, Duration::from_secs(2))
        .expect("db → outsider");
    assert!(tcp::echo_ok(&mut out));
    let sha = write_state(&state, &open_state(true));
    t.db.wait_applied(&sha, &mut agent);
    assert!(
        tcp::echo_ok(&mut out),
        "a tracked flow survives rule changes"
    );
    agent.stop();
}

#[test]
fn refused_connections_and_pings_never_reach_the_protected_table() {
    if !require_root("refused_connections_and_pings_never_reach_the_protected_table") {
        return;
    }
    let t = Lab::two_tier();
    let dir = TempDir::new("assured-ns");
    let state = dir.path("state.toml");
    // SSH from the admin range (nothing listens on 2222: refused), ICMP from anywhere.
    let text = format!(
        r#"[[security_group]]
id = "sg-db"
ingress = [
  {{ protocol = "tcp", ports = "2222", from = ["198.18.100.0/24", "2001:db8:100::/48"] }},
  {{ protocol = "tcp", ports = "9999", from = ["198.18.100.0/24", "2001:db8:100::/48"] }},
  {{ protocol = "icmp", icmp_type = 8, from = ["198.18.0.0/15"] }},
  {{ protocol = "icmpv6", icmp_type = 128, from = ["2001:db8::/32"] }},
]

[[interface]]
id = "eni-db"
mac = "{DB_MAC}"
ipv4 = ["198.18.2.21"]
ipv6 = ["2001:db8:2::21"]
groups = ["sg-db"]
"#
    );
    let sha = write_state(&state, &text);
    let mut agent = t.db.start_agent(&state, &[], &dir.path("agent.log"));
    t.db.wait_applied(&sha, &mut agent);
    for i in 0..50 {
        for to in ["198.18.2.21:2222", "[2001:db8:2::21]:2222"] {
            let refused = tcp::connect(&t.admin.ns, to, None, Duration::from_secs(1));
            assert!(refused.is_err(), "{to}: nothing listens there ({i})");
        }
        assert!(t.admin.ping("198.18.2.21"), "ping {i}");
        assert!(t.admin.ns.ping("2001:db8:2::21", 56, 1), "ping6 {i}");
    }
    let assured = |f: &Vec<serde_json::Value>| f.iter().filter(|f| f["assured"] == true).count();
    let now = flows(&t.db);
    assert!(
        !now.is_empty(),
        "the refused connections and pings were tracked"
    );
    assert_eq!(assured(&now), 0, "none of them is protected: {now:#?}");
    // A real handshake (db listens on 9999) is.
    let mut s = tcp::connect(
        &t.admin.ns,
        "198.18.2.21:9999",
        None,
        Duration::from_secs(2),
    )
    .expect("admin → db:9999");
    assert!(tcp::echo_ok(&mut s));
    wait_for("the handshake assured", Duration::from_secs(5), || {
        (assured(&flows(&t.db)) == 1).then_some(())
    });
    agent.stop();
}
