//! Real agents in namespaces, real sockets: both state formats, membership changes,
//! crash and restart under load, invalid states, two interfaces on one host.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use sg_tests::{
    lab::{tcp, write_state, Host, Lab, Prober, TempDir, TwoTier},
    privileges::require_root,
    wait_for,
};

fn example(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(name),
    )
    .expect("example")
}

/// The seed checks that involve the database and web1, from every side.
fn check_two_tier(t: &TwoTier, what: &str) {
    let cases: [(&str, &Host, &str, bool); 10] = [
        ("web1 → db:3306", &t.web1, "198.18.2.21:3306", true),
        ("web1 → db:3306 v6", &t.web1, "[2001:db8:2::21]:3306", true),
        ("outsider → db:3306", &t.outsider, "198.18.2.21:3306", false),
        (
            "outsider → db:3306 v6",
            &t.outsider,
            "[2001:db8:2::21]:3306",
            false,
        ),
        ("web1 → db:9999", &t.web1, "198.18.2.21:9999", false),
        ("outsider → web1:80", &t.outsider, "198.18.1.11:80", true),
        ("outsider → web1:22", &t.outsider, "198.18.1.11:22", false),
        ("admin → web1:22", &t.admin, "198.18.1.11:22", true),
        (
            "db → outsider:7777 (egress, stateful)",
            &t.db,
            "198.18.200.1:7777",
            true,
        ),
        (
            "web1 → outsider:7777 (egress, stateful)",
            &t.web1,
            "[2001:db8:200::1]:7777",
            true,
        ),
    ];
    for (name, from, to, want) in cases {
        assert_eq!(tcp::reaches(&from.ns, to), want, "{what}: {name}");
    }
}

#[test]
fn both_state_formats_enforce_the_same_and_restart_adopts() {
    if !require_root("both_state_formats_enforce_the_same_and_restart_adopts") {
        return;
    }
    let t = Lab::two_tier();
    let dir = TempDir::new("formats");
    for (i, file) in ["two-tier.toml", "two-tier.json"].into_iter().enumerate() {
        let state = dir.path(file);
        let sha = write_state(&state, &example(file));
        let mut agents = vec![];
        for h in [&t.web1, &t.db] {
            let mut a = h.start_agent(&state, &[], &dir.path(&format!("{}-{i}.log", h.name)));
            h.wait_applied(&sha, &mut a);
            agents.push(a);
        }
        check_two_tier(&t, file);
        // SIGTERM: programs stay attached and enforcing.
        for a in &mut agents {
            a.stop();
        }
        assert!(
            !tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"),
            "{file}: still enforced after the agent exits"
        );
        assert!(
            tcp::reaches(&t.web1.ns, "198.18.2.21:3306"),
            "{file}: still allowed after the agent exits"
        );
        let st = t.db.status().expect("status after exit");
        assert_eq!(st["agent_running"], false);
        assert_eq!(st["applied_state_sha256"].as_str(), Some(sha.as_str()));
    }
    // Detach removes everything: the database is open again.
    for h in [&t.web1, &t.db] {
        let out = h
            .cmd(sg_tests::lab::agent_bin())
            .arg("detach")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "detach: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_for("detach to take effect", Duration::from_secs(5), || {
        tcp::reaches(&t.outsider.ns, "198.18.2.21:3306").then_some(())
    });
    let link = String::from_utf8_lossy(&t.db.ns.ip(&["link", "show", "eth0"]).stdout).to_string();
    assert!(!link.contains("xdp"), "no program left: {link}");
}

/// The two-tier example with web3 in web-sg.
fn with_web3(base: &str) -> String {
    format!(
        "{base}\n[[interface]]\nid = \"eni-web3\"\nmac = \"02:5e:00:00:01:03\"\nipv4 = [\"198.18.1.13\"]\ngroups = [\"sg-0a00000000000web\"]\n"
    )
}

#[test]
fn membership_change_admits_new_and_keeps_established_connections() {
    if !require_root("membership_change_admits_new_and_keeps_established_connections") {
        return;
    }
    let (_lab, db, web3) = Lab::db_and_web3();
    let dir = TempDir::new("member");
    let state = dir.path("state.toml");
    let base = example("two-tier.toml");
    let sha = write_state(&state, &base);
    let mut agent = db.start_agent(&state, &[], &dir.path("db.log"));
    db.wait_applied(&sha, &mut agent);
    assert!(
        !tcp::reaches(&web3.ns, "198.18.2.21:3306"),
        "web3 is not a member yet"
    );

    let joined = with_web3(&base);
    let sha = write_state(&state, &joined);
    db.wait_applied(&sha, &mut agent);
    assert!(
        tcp::reaches(&web3.ns, "198.18.2.21:3306"),
        "web3 joined web-sg: admitted without a restart"
    );
    let mut established =
        tcp::connect(&web3.ns, "198.18.2.21:3306", None, Duration::from_secs(1)).expect("connect");
    assert!(tcp::echo_ok(&mut established));

    let sha = write_state(&state, &base);
    db.wait_applied(&sha, &mut agent);
    assert!(
        !tcp::reaches(&web3.ns, "198.18.2.21:3306"),
        "web3 left: new connections denied"
    );
    for _ in 0..5 {
        assert!(
            tcp::echo_ok(&mut established),
            "the established connection keeps working (SPEC §1.10)"
        );
    }
}

/// `base` (either format) with one more network interface: web3 in web-sg, under `id`.
fn with_member(base: &str, json: bool, id: &str) -> String {
    if !json {
        return format!(
            "{base}\n[[interface]]\nid = \"{id}\"\nipv4 = [\"198.18.1.13\"]\ngroups = [\"sg-0a00000000000web\"]\n"
        );
    }
    let list = base
        .find("\"NetworkInterfaces\"")
        .expect("a NetworkInterfaces list");
    let end = list + base[list..].find("\n  ]").expect("the end of the list");
    format!(
        "{},\n    {{ \"NetworkInterfaceId\": \"{id}\", \"PrivateIpAddress\": \"198.18.1.13\", \"Groups\": [{{ \"GroupId\": \"sg-0a00000000000web\" }}] }}{}",
        &base[..end],
        &base[end..]
    )
}

#[test]
fn membership_changes_apply_without_a_full_recompile_in_both_formats() {
    if !require_root("membership_changes_apply_without_a_full_recompile_in_both_formats") {
        return;
    }
    let (_lab, db, web3) = Lab::db_and_web3();
    for (name, json) in [("two-tier.toml", false), ("two-tier.json", true)] {
        let dir = TempDir::new("membership");
        let state = dir.path(name);
        let log = dir.path("db.log");
        let base = example(name);
        let sha = write_state(&state, &base);
        let mut agent = db.start_agent(&state, &[], &log);
        db.wait_applied(&sha, &mut agent);
        assert!(
            !tcp::reaches(&web3.ns, "198.18.2.21:3306"),
            "{name}: not a member yet"
        );

        let joined = with_member(&base, json, "eni-web3");
        let sha = write_state(&state, &joined);
        db.wait_applied(&sha, &mut agent);
        assert!(
            tcp::reaches(&web3.ns, "198.18.2.21:3306"),
            "{name}: web3 joined"
        );
        let applied = std::fs::read_to_string(&log).unwrap();
        assert!(
            applied.contains("(membership of 1 network interfaces): 1 map operations"),
            "{name}: the join was applied as a membership change:\n{applied}"
        );

        // A second interface with the same id: invalid, the joined state stays.
        let twice = with_member(&joined, json, "eni-web3");
        write_state(&state, &twice);
        let error = wait_for("the error in status", Duration::from_secs(10), || {
            db.status()?["last_error"].as_str().map(str::to_string)
        });
        assert!(
            error.contains("network interface eni-web3") && error.contains("duplicate id"),
            "{name}: {error}"
        );
        assert_eq!(
            db.status().unwrap()["applied_state_sha256"].as_str(),
            Some(sha.as_str())
        );
        assert!(
            tcp::reaches(&web3.ns, "198.18.2.21:3306"),
            "{name}: still a member"
        );

        // The database's own groups change: a full compile, still right.
        let isolated = base
            .replace(
                r#"[{ "GroupId": "sg-0a000000000000db", "GroupName": "db-sg" }]"#,
                "[]",
            )
            .replace(r#"groups = ["sg-0a000000000000db"]"#, "groups = []");
        assert_ne!(isolated, base);
        let sha = write_state(&state, &isolated);
        db.wait_applied(&sha, &mut agent);
        assert!(
            tcp::reaches(&web3.ns, "198.18.2.21:3306"),
            "{name}: a database without groups is not enforced"
        );
        let sha = write_state(&state, &base);
        db.wait_applied(&sha, &mut agent);
        assert!(
            !tcp::reaches(&web3.ns, "198.18.2.21:3306"),
            "{name}: web3 left"
        );
        drop(agent);
    }
}

#[test]
fn revalidate_mode_cuts_connections_that_policy_no_longer_allows() {
    if !require_root("revalidate_mode_cuts_connections_that_policy_no_longer_allows") {
        return;
    }
    let (_lab, db, web3) = Lab::db_and_web3();
    let dir = TempDir::new("revalidate");
    let state = dir.path("state.toml");
    let base = example("two-tier.toml");
    let joined = with_web3(&base);
    let sha = write_state(&state, &joined);
    let mut agent = db.start_agent(&state, &["--revalidate"], &dir.path("db.log"));
    db.wait_applied(&sha, &mut agent);
    let mut established =
        tcp::connect(&web3.ns, "198.18.2.21:3306", None, Duration::from_secs(1)).expect("connect");
    assert!(tcp::echo_ok(&mut established));
    let sha = write_state(&state, &base);
    db.wait_applied(&sha, &mut agent);
    assert!(
        !tcp::echo_ok(&mut established),
        "strict mode drops the connection the new policy denies"
    );
}

#[test]
fn kill_9_and_restart_under_load_breaks_nothing_and_lets_nothing_through() {
    if !require_root("kill_9_and_restart_under_load_breaks_nothing_and_lets_nothing_through") {
        return;
    }
    let t = Lab::two_tier();
    let dir = TempDir::new("kill9");
    let state = dir.path("state.toml");
    let sha = write_state(&state, &example("two-tier.toml"));
    let mut agent = t.db.start_agent(&state, &[], &dir.path("db-1.log"));
    t.db.wait_applied(&sha, &mut agent);

    let stop = Arc::new(AtomicBool::new(false));
    let broken = Arc::new(AtomicU64::new(0));
    let round_trips = Arc::new(AtomicU64::new(0));
    let mut streams = vec![];
    for _ in 0..50 {
        let mut s = tcp::connect(&t.web1.ns, "198.18.2.21:3306", None, Duration::from_secs(2))
            .expect("connect");
        let (stop, broken, rt) = (stop.clone(), broken.clone(), round_trips.clone());
        streams.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if tcp::echo_ok(&mut s) {
                    rt.fetch_add(1, Ordering::Relaxed);
                } else {
                    broken.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    let prober = Prober::start(&t.outsider.ns, "198.18.2.21:3306");
    // Load runs both ways before, while and after the agent is gone.
    let progress = |what: &str, trips: u64, tries: u64| {
        let (rt0, p0) = (round_trips.load(Ordering::Relaxed), prober.probes());
        wait_for(what, Duration::from_secs(10), || {
            (round_trips.load(Ordering::Relaxed) >= rt0 + trips && prober.probes() >= p0 + tries)
                .then_some(())
        });
    };
    progress("load before the kill", 200, 3);
    agent.kill9();
    progress("load with no agent", 200, 3);
    let started = Instant::now();
    let mut agent = t.db.start_agent(&state, &[], &dir.path("db-2.log"));
    t.db.wait_applied(&sha, &mut agent);
    let log = agent.log_text();
    assert!(
        log.contains("adopted pinned state"),
        "the restarted agent adopts the pins:\n{log}"
    );
    assert!(
        log.contains(": 0 map operations"),
        "and applies only the difference (none):\n{log}"
    );
    progress("load after the restart", 300, 3);
    stop.store(true, Ordering::Relaxed);
    for s in streams {
        s.join().unwrap();
    }
    let (probes, delivered) = prober.finish();
    eprintln!(
        "kill -9: restart applied in {:.0?}; {} round trips on 50 connections, {} broken; {probes} denied probes, {delivered} delivered",
        started.elapsed(),
        round_trips.load(Ordering::Relaxed),
        broken.load(Ordering::Relaxed),
    );
    assert_eq!(
        broken.load(Ordering::Relaxed),
        0,
        "established connections broken"
    );
    assert_eq!(delivered, 0, "denied probes delivered");
    assert!(probes > 5);
}

#[test]
fn an_invalid_state_keeps_the_last_valid_one_enforced() {
    if !require_root("an_invalid_state_keeps_the_last_valid_one_enforced") {
        return;
    }
    let t = Lab::two_tier();
    let dir = TempDir::new("invalid");
    let state = dir.path("state.toml");
    let good = example("two-tier.toml");
    let sha = write_state(&state, &good);
    let mut agent = t.db.start_agent(&state, &[], &dir.path("db.log"));
    t.db.wait_applied(&sha, &mut agent);
    let bad = good.replace("ports = \"3306\"", "ports = \"3306-80\"");
    write_state(&state, &bad);
    let st = wait_for("the error in status", Duration::from_secs(10), || {
        let s = t.db.status()?;
        s["last_error"].as_str().map(|e| e.to_string())
    });
    assert!(
        st.contains("sg-0a000000000000db") && st.contains("ingress[0].ports"),
        "error names object and field: {st}"
    );
    assert_eq!(
        t.db.status().unwrap()["applied_state_sha256"].as_str(),
        Some(sha.as_str())
    );
    assert!(
        tcp::reaches(&t.web1.ns, "198.18.2.21:3306"),
        "old policy still allows"
    );
    assert!(
        !tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"),
        "old policy still denies"
    );
    // An invalid state at start: exit 1, nothing attached.
    let fresh = TempDir::new("invalid-start");
    let bad_path = fresh.path("bad.toml");
    std::fs::write(&bad_path, &bad).unwrap();
    let out = t
        .outsider
        .cmd(sg_tests::lab::agent_bin())
        .args(["run", "--state"])
        .arg(&bad_path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link =
        String::from_utf8_lossy(&t.outsider.ns.ip(&["link", "show", "eth0"]).stdout).to_string();
    assert!(!link.contains("xdp"));
    assert!(
        tcp::reaches(&t.web1.ns, "198.18.200.1:7777"),
        "nothing attached on the outsider"
    );
}

#[test]
fn two_interfaces_in_different_groups_are_enforced_independently() {
    if !require_root("two_interfaces_in_different_groups_are_enforced_independently") {
        return;
    }
    let mut lab = Lab::new();
    let multi = lab.host("multi", "02:5e:00:00:05:00", &["198.18.5.1/16"]);
    // A second interface on the same bridge, in another subnet.
    let port = "pm1";
    sg_tests::netns::run(std::process::Command::new("ip").args([
        "link",
        "add",
        "eth1",
        "netns",
        multi.ns.name(),
        "address",
        "02:5e:00:00:05:01",
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        lab.switch.name(),
    ]));
    lab.switch.ip(&["link", "set", port, "master", "br0", "up"]);
    multi
        .ns
        .ip(&["addr", "add", "198.19.5.1/24", "dev", "eth1"]);
    multi.ns.ip(&["link", "set", "eth1", "up"]);
    for (k, v) in [("arp_ignore", "1"), ("arp_announce", "2")] {
        for dev in ["all", "eth0", "eth1"] {
            multi
                .cmd("sysctl")
                .args(["-qw", &format!("net.ipv4.conf.{dev}.{k}={v}")])
                .status()
                .unwrap();
        }
    }
    let web = lab.host(
        "web",
        "02:5e:00:00:05:02",
        &["198.18.5.2/16", "198.19.5.2/24"],
    );
    let other = lab.host(
        "other",
        "02:5e:00:00:05:03",
        &["198.18.5.3/16", "198.19.5.3/24"],
    );
    tcp::echo_server(&multi.ns, "0.0.0.0:80");
    tcp::echo_server(&multi.ns, "0.0.0.0:3306");
    wait_for("the lab", Duration::from_secs(10), || {
        tcp::reaches(&other.ns, "198.19.5.1:3306").then_some(())
    });
    let text = r#"
[[security_group]]
id = "sg-web"
ingress = [{ protocol = "tcp", ports = "80", from = ["0.0.0.0/0"] }]
[[security_group]]
id = "sg-db"
ingress = [{ protocol = "tcp", ports = "3306", from = ["sg-web"] }]
[[interface]]
id = "eni-multi-0"
mac = "02:5e:00:00:05:00"
ipv4 = ["198.18.5.1"]
groups = ["sg-web"]
[[interface]]
id = "eni-multi-1"
mac = "02:5e:00:00:05:01"
ipv4 = ["198.19.5.1"]
groups = ["sg-db"]
[[interface]]
id = "eni-web"
ipv4 = ["198.18.5.2", "198.19.5.2"]
groups = ["sg-web"]
"#;
    let dir = TempDir::new("two-ifaces");
    let state = dir.path("state.toml");
    let sha = write_state(&state, text);
    let mut agent = multi.start_agent(&state, &[], &dir.path("multi.log"));
    multi.wait_applied(&sha, &mut agent);
    let st = multi.status().unwrap();
    assert_eq!(
        st["interfaces"].as_array().map(|a| a.len()),
        Some(2),
        "{st}"
    );
    assert!(
        tcp::reaches(&other.ns, "198.18.5.1:80"),
        "eth0 (web-sg): 80 from anywhere"
    );
    assert!(
        !tcp::reaches(&other.ns, "198.18.5.1:3306"),
        "eth0 (web-sg): no 3306"
    );
    assert!(
        !tcp::reaches(&other.ns, "198.19.5.1:80"),
        "eth1 (db-sg): no 80"
    );
    assert!(
        !tcp::reaches(&other.ns, "198.19.5.1:3306"),
        "eth1 (db-sg): 3306 only from web-sg members"
    );
    assert!(
        tcp::reaches_from(&web.ns, "198.19.5.1:3306", Some("198.19.5.2")),
        "eth1 (db-sg): 3306 from a web-sg member (secondary address)"
    );
}

#[test]
fn default_deny_enforces_interfaces_without_groups() {
    if !require_root("default_deny_enforces_interfaces_without_groups") {
        return;
    }
    let mut lab = Lab::new();
    let bare = lab.host("bare", "02:5e:00:00:07:01", &["198.18.7.1/16"]);
    let other = lab.host("oth", "02:5e:00:00:07:02", &["198.18.7.2/16"]);
    tcp::echo_server(&bare.ns, "[::]:8080");
    tcp::echo_server(&other.ns, "[::]:8080");
    wait_for("the lab", Duration::from_secs(10), || {
        tcp::reaches(&other.ns, "198.18.7.1:8080").then_some(())
    });
    let dir = TempDir::new("default-deny");
    let state = dir.path("state.toml");
    let sha = write_state(&state, "[[interface]]\nid = \"eni-bare\"\nmac = \"02:5e:00:00:07:01\"\nipv4 = [\"198.18.7.1\"]\ngroups = []\n");
    // Without --default-deny an interface with no groups is not enforced.
    let mut agent = bare.start_agent(&state, &[], &dir.path("bare-1.log"));
    bare.wait_applied(&sha, &mut agent);
    assert_eq!(
        bare.status().unwrap()["interfaces"]
            .as_array()
            .map(|a| a.len()),
        Some(0)
    );
    assert!(
        tcp::reaches(&other.ns, "198.18.7.1:8080"),
        "not enforced: open"
    );
    agent.stop();
    // With it, everything but infrastructure (ARP, ND) is dropped, both ways. The
    // neighbour caches are emptied first, so that ARP must run again (the first part's
    // entries would otherwise answer for it, and nothing would count as infrastructure).
    other.ns.ip(&["neigh", "flush", "all"]);
    bare.ns.ip(&["neigh", "flush", "all"]);
    let mut agent = bare.start_agent(&state, &["--default-deny"], &dir.path("bare-2.log"));
    bare.wait_applied(&sha, &mut agent);
    assert!(
        !tcp::reaches(&other.ns, "198.18.7.1:8080"),
        "default deny: inbound dropped"
    );
    assert!(
        !tcp::reaches(&bare.ns, "198.18.7.2:8080"),
        "default deny: outbound dropped"
    );
    assert!(!other.ping("198.18.7.1"), "default deny: ping dropped");
    let st = bare.status().unwrap();
    assert!(
        st["interfaces"][0]["counters"]["ingress"]["infrastructure"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "ARP passes and is counted: {st}"
    );
}

#[test]
fn an_upgraded_agent_and_detach_remove_the_pins_of_retired_maps() {
    if !require_root("an_upgraded_agent_and_detach_remove_the_pins_of_retired_maps") {
        return;
    }
    let (_lab, db, _web3) = Lab::db_and_web3();
    let dir = TempDir::new("retired");
    let state = dir.path("state.toml");
    let sha = write_state(&state, &example("two-tier.toml"));
    // What an earlier build left: its counters map pinned under the old name.
    let pins = "/sys/fs/bpf/sg";
    let made = db
        .cmd("sh")
        .arg("-c")
        .arg(format!(
            "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; mkdir -p {pins} && bpftool map create {pins}/SG_COUNTERS type array key 4 value 512 entries 256 name SG_COUNTERS"
        ))
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let exists = |name: &str| {
        db.cmd("test")
            .args(["-e", &format!("{pins}/{name}")])
            .status()
            .unwrap()
            .success()
    };
    assert!(exists("SG_COUNTERS"));
    // And its established table (entries without sequence tracking) holding one live
    // connection from web1 to the database: the upgrade must not lose it.
    let ifindex = db.ns.ifindex("eth0");
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let now_ns = (uptime * 1e9) as u64;
    let mut key = Vec::new();
    key.extend_from_slice(&ifindex.to_le_bytes());
    key.extend_from_slice(&[4, 6]);
    key.extend_from_slice(&3306u16.to_be_bytes());
    key.extend_from_slice(&45678u16.to_be_bytes());
    key.extend_from_slice(&[0, 0]);
    let v4 = |a: [u8; 4]| [a.to_vec(), vec![0; 12]].concat();
    key.extend(v4([198, 18, 2, 21]));
    key.extend(v4([198, 18, 1, 11]));
    let mut value = Vec::new();
    value.extend_from_slice(&now_ns.to_le_bytes());
    value.extend_from_slice(&now_ns.to_le_bytes());
    for n in [3u64, 2, 180, 120] {
        value.extend_from_slice(&n.to_le_bytes());
    }
    value.extend_from_slice(&0u32.to_le_bytes());
    // origin ingress, established, seen-reply and assured.
    value.extend_from_slice(&[0, 3, 17, 0]);
    let hex = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let made = db
        .cmd("sh")
        .arg("-c")
        .arg(format!(
            "bpftool map create {pins}/SG_CT type hash key 44 value 56 entries 16 name SG_CT \
             && bpftool map update pinned {pins}/SG_CT key hex {} value hex {}",
            hex(&key),
            hex(&value)
        ))
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let mut agent = db.start_agent(&state, &[], &dir.path("db.log"));
    db.wait_applied(&sha, &mut agent);
    assert!(
        !exists("SG_COUNTERS") && !exists("SG_CT"),
        "the upgraded agent removed the retired pins"
    );
    assert!(exists("SG_COUNTERS_V2") && exists("SG_CT_V2"));
    let flows = db
        .cmd(sg_tests::lab::agent_bin())
        .args(["flows", "--json"])
        .output()
        .unwrap();
    let flows: serde_json::Value = serde_json::from_slice(&flows.stdout).unwrap();
    assert!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["remote"] == "198.18.1.11"
                && f["remote_port"] == 45678
                && f["tcp_state"] == "established"),
        "the earlier build's flow was carried over: {flows}"
    );
    let log = std::fs::read_to_string(dir.path("db.log")).unwrap();
    assert!(
        log.contains("carried 1 flows over from the earlier build's tables"),
        "{log}"
    );
    agent.stop();
    // A retired pin left behind is removed by detach too.
    let made = db
        .cmd("bpftool")
        .args([
            "map",
            "create",
            &format!("{pins}/SG_EVENTS"),
            "type",
            "array",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "1",
            "name",
            "SG_EVENTS",
        ])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let out = db
        .cmd(sg_tests::lab::agent_bin())
        .arg("detach")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !exists("SG_EVENTS") && !exists(""),
        "detach removed everything"
    );
}

#[test]
fn a_stop_the_moment_the_state_is_applied_is_a_clean_stop() {
    if !require_root("a_stop_the_moment_the_state_is_applied_is_a_clean_stop") {
        return;
    }
    // Once the status says "applied", the agent is whole: its monitor socket is open and
    // a SIGTERM is a clean stop (exit 0, after the flow log is flushed), never the
    // default action that kills it mid-way.
    let t = Lab::two_tier();
    let dir = TempDir::new("stop-at-once");
    let state = dir.path("state.toml");
    let sha = write_state(&state, &example("two-tier.toml"));
    let flow_log = dir.path("flow.log");
    for round in 0..3 {
        let log = dir.path(&format!("agent{round}.log"));
        let mut agent =
            t.db.start_agent(&state, &["--flow-log", flow_log.to_str().unwrap()], &log);
        let pid = agent.child.id();
        // No pause between polls: the first status that says applied is acted on.
        let deadline = Instant::now() + Duration::from_secs(90);
        let status = loop {
            if let Ok(Some(st)) = agent.child.try_wait() {
                panic!("sg-agent exited ({st}):\n{}", agent.log_text());
            }
            assert!(Instant::now() < deadline, "round {round}: never applied");
            match t.db.status() {
                Some(s)
                    if s["agent_pid"].as_u64() == Some(pid as u64)
                        && s["applied_state_sha256"].as_str() == Some(sha.as_str()) =>
                {
                    break s
                }
                _ => {}
            }
        };
        let run_dir = status["run_dir"].as_str().expect("run_dir").to_string();
        let socket =
            t.db.cmd("test")
                .args(["-S", &format!("{run_dir}/monitor.sock")])
                .status()
                .expect("test -S");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let exit = agent.child.wait().expect("wait");
        assert!(
            socket.success(),
            "round {round}: applied before the monitor socket existed"
        );
        assert!(
            exit.success(),
            "round {round}: SIGTERM right after applied ended the agent with {exit}:\n{}",
            agent.log_text()
        );
        assert!(
            agent.log_text().contains("stopping"),
            "round {round}: {}",
            agent.log_text()
        );
    }
}
