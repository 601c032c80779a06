//! End-to-end scenarios with real agents and real traffic: the seed demo itself, and cases
//! transcribed from OpenStack Neutron's security-group scenario tests (adapted to AWS
//! semantics where they differ: an established session survives a group detach).

use std::time::Duration;

use sg_tests::{
    lab::{tcp, write_state, AgentProc, Host, Lab, TempDir},
    privileges::require_root,
    wait_for,
};

const SRV_MAC: &str = "02:5e:00:00:0a:01";

/// A server running an agent, two members of group G (m1, m2), and an outsider.
struct World {
    _lab: Lab,
    srv: Host,
    m1: Host,
    m2: Host,
    out: Host,
    dir: TempDir,
    agent: Option<AgentProc>,
    /// Agents on the members, for the self-reference scenario.
    member_agents: Vec<AgentProc>,
}

const MEMBERS: &str = r#"
[[interface]]
id = "eni-srv"
mac = "02:5e:00:00:0a:01"
ipv4 = ["198.18.10.1"]
ipv6 = ["2001:db8:10::1"]
groups = [GROUPS]

[[interface]]
id = "eni-m1"
mac = "02:5e:00:00:0a:02"
ipv4 = ["198.18.10.2"]
ipv6 = ["2001:db8:10::2"]
groups = ["sg-g"]

[[interface]]
id = "eni-m2"
mac = "02:5e:00:00:0a:03"
ipv4 = ["198.18.10.3"]
ipv6 = ["2001:db8:10::3"]
groups = ["sg-g"]
"#;

fn world(tag: &str, ports: &[&str]) -> World {
    let mut lab = Lab::new();
    let srv = lab.host("srv", SRV_MAC, &["198.18.10.1/16", "2001:db8:10::1/32"]);
    let m1 = lab.host(
        "m1",
        "02:5e:00:00:0a:02",
        &["198.18.10.2/16", "2001:db8:10::2/32"],
    );
    let m2 = lab.host(
        "m2",
        "02:5e:00:00:0a:03",
        &["198.18.10.3/16", "2001:db8:10::3/32"],
    );
    let out = lab.host(
        "out",
        "02:5e:00:00:0a:04",
        &["198.18.10.4/16", "2001:db8:10::4/32"],
    );
    for p in ports {
        tcp::echo_server(&srv.ns, &format!("[::]:{p}"));
        tcp::echo_server(&m2.ns, &format!("[::]:{p}"));
    }
    wait_for("the lab", Duration::from_secs(10), || {
        tcp::reaches(&out.ns, &format!("198.18.10.1:{}", ports[0])).then_some(())
    });
    World {
        _lab: lab,
        srv,
        m1,
        m2,
        out,
        dir: TempDir::new(tag),
        agent: None,
        member_agents: vec![],
    }
}

impl World {
    /// Writes the state (groups of the server substituted) and waits until the server's
    /// agent (started on first use) applies it.
    fn apply(&mut self, groups_text: &str, srv_groups: &[&str]) {
        let groups: Vec<String> = srv_groups.iter().map(|g| format!("\"{g}\"")).collect();
        let text = format!(
            "{groups_text}\n{}",
            MEMBERS.replace("GROUPS", &groups.join(", "))
        );
        let state = self.dir.path("state.toml");
        let sha = write_state(&state, &text);
        if self.agent.is_none() {
            self.agent = Some(self.srv.start_agent(&state, &[], &self.dir.path("srv.log")));
        }
        let agent = self.agent.as_mut().unwrap();
        self.srv.wait_applied(&sha, agent);
        for (h, a) in [&self.m1, &self.m2]
            .into_iter()
            .zip(self.member_agents.iter_mut())
        {
            h.wait_applied(&sha, a);
        }
    }
}

const G: &str = "[[security_group]]\nid = \"sg-g\"\n";

#[test]
fn demo_scenario_passes() {
    if !require_root("demo_scenario_passes") {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sg-demo"))
        .output()
        .expect("running sg-demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(" 0 mismatches"), "{text}");
}

#[test]
fn two_groups_on_one_interface_ssh_and_icmp() {
    if !require_root("two_groups_on_one_interface_ssh_and_icmp") {
        return;
    }
    let mut w = world("two-groups", &["22"]);
    let groups = format!(
        "{G}[[security_group]]\nid = \"sg-ssh\"\ningress = [{{ protocol = \"tcp\", ports = \"22\", from = [\"0.0.0.0/0\"] }}]\n\
         [[security_group]]\nid = \"sg-icmp\"\ningress = [{{ protocol = \"icmp\", from = [\"0.0.0.0/0\"] }}]\n"
    );
    w.apply(&groups, &["sg-ssh", "sg-icmp"]);
    assert!(w.out.ping("198.18.10.1"), "ping allowed by the ICMP group");
    assert!(
        tcp::reaches(&w.out.ns, "198.18.10.1:22"),
        "ssh allowed by the SSH group"
    );
    w.apply(&groups, &["sg-ssh"]);
    assert!(
        !w.out.ping("198.18.10.1"),
        "ICMP group detached: ping denied"
    );
    assert!(
        tcp::reaches(&w.out.ns, "198.18.10.1:22"),
        "ssh still allowed"
    );
    w.apply(&groups, &["sg-ssh", "sg-icmp"]);
    assert!(
        w.out.ping("198.18.10.1"),
        "ICMP group attached again: ping allowed"
    );
}

#[test]
fn icmp_by_protocol_number() {
    if !require_root("icmp_by_protocol_number") {
        return;
    }
    let mut w = world("icmp-number", &["22"]);
    let groups = format!("{G}[[security_group]]\nid = \"sg-s\"\ningress = [{{ protocol = \"1\", from = [\"198.18.0.0/16\"] }}, {{ protocol = 58, from = [\"2001:db8::/32\"] }}]\n");
    w.apply(&groups, &["sg-s"]);
    assert!(w.out.ping("198.18.10.1"), "icmp as protocol 1");
    assert!(w.out.ping("2001:db8:10::1"), "icmpv6 as protocol 58");
    assert!(!tcp::reaches(&w.out.ns, "198.18.10.1:22"));
}

#[test]
fn remote_group_and_overlapping_cidr_both_allowing() {
    if !require_root("remote_group_and_overlapping_cidr_both_allowing") {
        return;
    }
    let mut w = world("overlap", &["5000"]);
    let both = format!("{G}[[security_group]]\nid = \"sg-s\"\ningress = [{{ protocol = \"tcp\", ports = \"5000\", from = [\"sg-g\"] }}, {{ protocol = \"tcp\", ports = \"5000\", from = [\"198.18.10.0/24\"] }}]\n");
    let group_only = format!("{G}[[security_group]]\nid = \"sg-s\"\ningress = [{{ protocol = \"tcp\", ports = \"5000\", from = [\"sg-g\"] }}]\n");
    let cidr_only = format!("{G}[[security_group]]\nid = \"sg-s\"\ningress = [{{ protocol = \"tcp\", ports = \"5000\", from = [\"198.18.10.0/24\"] }}]\n");
    let neither = format!("{G}[[security_group]]\nid = \"sg-s\"\n");
    w.apply(&both, &["sg-s"]);
    assert!(tcp::reaches(&w.m1.ns, "198.18.10.1:5000"), "both rules");
    w.apply(&group_only, &["sg-s"]);
    assert!(
        tcp::reaches(&w.m1.ns, "198.18.10.1:5000"),
        "CIDR rule removed, group rule still allows"
    );
    assert!(
        !tcp::reaches(&w.out.ns, "198.18.10.1:5000"),
        "the outsider only had the CIDR rule"
    );
    w.apply(&cidr_only, &["sg-s"]);
    assert!(
        tcp::reaches(&w.m1.ns, "198.18.10.1:5000"),
        "group rule removed, CIDR rule still allows"
    );
    w.apply(&neither, &["sg-s"]);
    assert!(
        !tcp::reaches(&w.m1.ns, "198.18.10.1:5000"),
        "both removed: denied"
    );
}

#[test]
fn port_ranges_from_a_group_and_deleting_one() {
    if !require_root("port_ranges_from_a_group_and_deleting_one") {
        return;
    }
    let mut w = world("ranges", &["80", "81", "82", "83"]);
    let rules = |with_80: bool| {
        let r80 = if with_80 {
            "{ protocol = \"tcp\", ports = \"80-81\", from = [\"sg-g\"] }, "
        } else {
            ""
        };
        format!("{G}[[security_group]]\nid = \"sg-s\"\ningress = [{r80}{{ protocol = \"tcp\", ports = \"82-83\", from = [\"sg-g\"] }}]\n")
    };
    w.apply(&rules(true), &["sg-s"]);
    for p in 80..=83 {
        assert!(
            tcp::reaches(&w.m1.ns, &format!("198.18.10.1:{p}")),
            "member reaches {p}"
        );
        assert!(
            !tcp::reaches(&w.out.ns, &format!("198.18.10.1:{p}")),
            "non-member does not reach {p}"
        );
    }
    w.apply(&rules(false), &["sg-s"]);
    for (p, want) in [(80, false), (81, false), (82, true), (83, true)] {
        assert_eq!(
            tcp::reaches(&w.m1.ns, &format!("198.18.10.1:{p}")),
            want,
            "after deleting 80-81: port {p}"
        );
    }
}

#[test]
fn self_reference_lets_members_reach_each_other() {
    if !require_root("self_reference_lets_members_reach_each_other") {
        return;
    }
    let mut w = world("self-ref", &["7000"]);
    let no_self = format!("{G}[[security_group]]\nid = \"sg-s\"\n");
    // Agents on both members (they enforce sg-g on themselves).
    let state = w.dir.path("state.toml");
    let text = format!("{no_self}\n{}", MEMBERS.replace("GROUPS", "\"sg-s\""));
    write_state(&state, &text);
    w.member_agents = vec![
        w.m1.start_agent(&state, &[], &w.dir.path("m1.log")),
        w.m2.start_agent(&state, &[], &w.dir.path("m2.log")),
    ];
    w.apply(&no_self, &["sg-s"]);
    assert!(
        !tcp::reaches(&w.m1.ns, "198.18.10.3:7000"),
        "no self-reference: m1 cannot reach m2"
    );
    let with_self = "[[security_group]]\nid = \"sg-g\"\ningress = [{ protocol = \"tcp\", ports = \"7000\", from = [\"sg-g\"] }]\n[[security_group]]\nid = \"sg-s\"\n";
    w.apply(with_self, &["sg-s"]);
    assert!(
        tcp::reaches(&w.m1.ns, "198.18.10.3:7000"),
        "ingress self-reference: m1 reaches m2"
    );
    assert!(
        tcp::reaches(&w.m1.ns, "[2001:db8:10::3]:7000"),
        "and over IPv6"
    );
    assert!(
        !tcp::reaches(&w.out.ns, "198.18.10.3:7000"),
        "a non-member still cannot"
    );
}

#[test]
fn established_session_survives_detaching_the_group() {
    if !require_root("established_session_survives_detaching_the_group") {
        return;
    }
    let mut w = world("survive", &["22"]);
    let groups = format!("{G}[[security_group]]\nid = \"sg-ssh\"\ningress = [{{ protocol = \"tcp\", ports = \"22\", from = [\"0.0.0.0/0\", \"::/0\"] }}]\negress = []\n[[security_group]]\nid = \"sg-none\"\negress = []\n");
    w.apply(&groups, &["sg-ssh"]);
    let mut v4 =
        tcp::connect(&w.out.ns, "198.18.10.1:22", None, Duration::from_secs(1)).expect("ssh v4");
    let mut v6 = tcp::connect(
        &w.out.ns,
        "[2001:db8:10::1]:22",
        None,
        Duration::from_secs(1),
    )
    .expect("ssh v6");
    assert!(tcp::echo_ok(&mut v4) && tcp::echo_ok(&mut v6));
    w.apply(&groups, &["sg-none"]);
    assert!(
        !tcp::reaches(&w.out.ns, "198.18.10.1:22"),
        "new sessions denied"
    );
    for _ in 0..3 {
        assert!(
            tcp::echo_ok(&mut v4),
            "established IPv4 session survives (AWS; Neutron expects the opposite)"
        );
        assert!(tcp::echo_ok(&mut v6), "established IPv6 session survives");
    }
}

#[test]
fn fragmented_ping_to_allowed_and_denied_destinations() {
    if !require_root("fragmented_ping_to_allowed_and_denied_destinations") {
        return;
    }
    for hook in ["tc", "xdp"] {
        let mut lab = Lab::new();
        let srv = lab.host("srv", SRV_MAC, &["198.18.10.1/16", "2001:db8:10::1/32"]);
        let out = lab.host(
            "out",
            "02:5e:00:00:0a:04",
            &["198.18.10.4/16", "2001:db8:10::4/32"],
        );
        let other = lab.host(
            "oth",
            "02:5e:00:00:0a:05",
            &["198.18.10.5/16", "2001:db8:10::5/32"],
        );
        wait_for("the lab", Duration::from_secs(10), || {
            out.ping("198.18.10.1").then_some(())
        });
        let dir = TempDir::new("frag");
        let state = dir.path("state.toml");
        let text = r#"
[[security_group]]
id = "sg-s"
ingress = [
  { protocol = "icmp", icmp_type = 8, from = ["198.18.10.4/32"] },
  { protocol = "icmpv6", icmp_type = 128, from = ["2001:db8:10::4/128"] },
]
[[interface]]
id = "eni-srv"
mac = "02:5e:00:00:0a:01"
ipv4 = ["198.18.10.1"]
ipv6 = ["2001:db8:10::1"]
groups = ["sg-s"]
"#;
        let sha = write_state(&state, text);
        let mut agent = srv.start_agent(&state, &["--ingress-hook", hook], &dir.path("srv.log"));
        srv.wait_applied(&sha, &mut agent);
        assert!(
            out.ns.ping("198.18.10.1", 4000, 2),
            "{hook}: fragmented ping to an allowed destination is delivered"
        );
        assert!(
            out.ns.ping("2001:db8:10::1", 4000, 2),
            "{hook}: fragmented ping6 to an allowed destination is delivered"
        );
        assert!(
            !other.ns.ping("198.18.10.1", 4000, 1),
            "{hook}: fragmented ping from a denied source: nothing delivered"
        );
        assert!(
            !other.ns.ping("2001:db8:10::1", 4000, 1),
            "{hook}: fragmented ping6 from a denied source: nothing delivered"
        );
        let st = srv.status().unwrap();
        let frags = st["interfaces"][0]["counters"]["ingress"]["allowed_fragment"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            frags >= 4,
            "{hook}: later fragments followed their first fragment: {st}"
        );
    }
}

#[test]
fn ipv6_web_and_database_checks() {
    if !require_root("ipv6_web_and_database_checks") {
        return;
    }
    let mut w = world("v6", &["80", "3306"]);
    let groups = format!("{G}[[security_group]]\nid = \"sg-s\"\ningress = [{{ protocol = \"tcp\", ports = \"80\", from = [\"::/0\"] }}, {{ protocol = \"tcp\", ports = \"3306\", from = [\"sg-g\"] }}]\n");
    w.apply(&groups, &["sg-s"]);
    assert!(
        tcp::reaches(&w.out.ns, "[2001:db8:10::1]:80"),
        "web over IPv6 from anywhere"
    );
    assert!(
        !tcp::reaches(&w.out.ns, "198.18.10.1:80"),
        "the rule is ::/0 only: IPv4 denied"
    );
    assert!(
        tcp::reaches(&w.m1.ns, "[2001:db8:10::1]:3306"),
        "database over IPv6 from a member"
    );
    assert!(
        tcp::reaches(&w.m1.ns, "198.18.10.1:3306"),
        "and over IPv4 from the member's IPv4 address"
    );
    assert!(
        !tcp::reaches(&w.out.ns, "[2001:db8:10::1]:3306"),
        "database over IPv6 from a non-member"
    );
}
