//! Seeing what sg does (SPEC §5, §7), with real agents and real traffic in namespaces:
//! the effective policy read back from the maps, explain from the live maps, diff before
//! an apply, stable rule ids.

use std::{process::Output, time::Duration};

use sg_tests::{
    lab::{agent_bin, example, tcp, write_state, Host, Lab, TempDir},
    privileges::require_root,
};

const DB_ENI: &str = "eni-000000000000000db";

fn run(h: &Host, args: &[&str]) -> Output {
    h.cmd(agent_bin()).args(args).output().expect("sg-agent")
}

fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The db interface's ingress rule for tcp 3306, as `policy --json` shows it.
fn db_rule(h: &Host) -> serde_json::Value {
    let doc = json_of(&run(h, &["policy", "--json"]));
    let iface = doc["interfaces"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["network_interface"] == DB_ENI))
        .unwrap_or_else(|| panic!("db in the policy: {doc}"))
        .clone();
    iface["ingress"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["ports"] == "3306"))
        .unwrap_or_else(|| panic!("a 3306 rule: {iface}"))
        .clone()
}

fn explain_live(h: &Host, remote: &str, port: &str) -> serde_json::Value {
    json_of(&run(
        h,
        &[
            "explain",
            "--live",
            "--eni",
            DB_ENI,
            "--direction",
            "ingress",
            "--protocol",
            "tcp",
            "--remote",
            remote,
            "--port",
            port,
            "--json",
        ],
    ))
}

#[test]
fn policy_explain_and_diff_read_what_the_kernel_enforces() {
    if !require_root("policy_explain_and_diff_read_what_the_kernel_enforces") {
        return;
    }
    let t = Lab::two_tier();
    let dir = TempDir::new("observe");
    let state = dir.path("state.toml");
    let base = example("two-tier.toml");
    let sha = write_state(&state, &base);
    let mut agent = t.db.start_agent(&state, &[], &dir.path("db.log"));
    t.db.wait_applied(&sha, &mut agent);
    assert!(tcp::reaches(&t.web1.ns, "198.18.2.21:3306"));

    // policy: the rule as programmed, its members' prefixes, its stable id and its hits.
    let rule = db_rule(&t.db);
    let id = rule["rule_id"].as_str().expect("rule id").to_string();
    assert!(id.starts_with("sgr-") && id.len() == 21, "{rule}");
    assert_eq!(rule["group_id"], "sg-0a000000000000db");
    assert_eq!(rule["protocol"], "tcp");
    let peers: Vec<&str> = rule["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    for member in ["198.18.1.11/32", "198.18.1.12/32", "2001:db8:1::11/128"] {
        assert!(peers.contains(&member), "{member} in {peers:?}");
    }
    assert!(rule["hits"].as_u64().unwrap() >= 1, "{rule}");
    let text = String::from_utf8_lossy(&run(&t.db, &["policy"]).stdout).to_string();
    assert!(
        text.contains(&id) && text.contains("tcp 3306 from"),
        "{text}"
    );

    // explain --live: the same rule, and the tracked flow of an open connection.
    let allowed = explain_live(&t.db, "198.18.1.11", "3306");
    assert_eq!(allowed["verdict"], "ALLOW", "{allowed}");
    assert_eq!(allowed["source"], "live");
    assert_eq!(allowed["rule_id"].as_str(), Some(id.as_str()));
    assert!(allowed["tracked_flow"].is_null(), "{allowed}");
    let denied = explain_live(&t.db, "198.18.200.1", "3306");
    assert_eq!(denied["verdict"], "DENY", "{denied}");
    let _conn = tcp::connect(&t.web1.ns, "198.18.2.21:3306", None, Duration::from_secs(2))
        .expect("web1 connects to the database");
    let tracked = explain_live(&t.db, "198.18.1.11", "3306");
    assert_eq!(
        tracked["tracked_flow"]["rule_id"].as_str(),
        Some(id.as_str()),
        "{tracked}"
    );
    let words = String::from_utf8_lossy(
        &run(
            &t.db,
            &[
                "explain",
                "--live",
                "--eni",
                DB_ENI,
                "--direction",
                "ingress",
                "--protocol",
                "tcp",
                "--remote",
                "198.18.1.11",
                "--port",
                "3306",
            ],
        )
        .stdout,
    )
    .to_string();
    assert!(
        words.starts_with("ALLOW") && words.contains(&id) && words.contains("tracked flow"),
        "{words}"
    );
    // explain from the file names the same id.
    let from_file = json_of(&run(
        &t.db,
        &[
            "explain",
            "--state",
            state.to_str().unwrap(),
            "--eni",
            DB_ENI,
            "--direction",
            "ingress",
            "--protocol",
            "tcp",
            "--remote",
            "198.18.1.11",
            "--port",
            "3306",
            "--json",
        ],
    ));
    assert_eq!(from_file["rule_id"].as_str(), Some(id.as_str()));

    // diff: the applied file changes nothing (exit 0); removing the rule would (exit 2)
    // and names it; an invalid file is refused (exit 1).
    let same = run(
        &t.db,
        &["diff", "--state", state.to_str().unwrap(), "--json"],
    );
    assert_eq!(same.status.code(), Some(0), "{}", json_of(&same));
    let without = dir.path("without.toml");
    write_state(
        &without,
        &base.replace(
            "{ protocol = \"tcp\", ports = \"3306\", from = [\"sg-0a00000000000web\"], description = \"MySQL from web servers\" },",
            "",
        ),
    );
    let removed = run(
        &t.db,
        &["diff", "--state", without.to_str().unwrap(), "--json"],
    );
    assert_eq!(removed.status.code(), Some(2), "{}", json_of(&removed));
    let d = json_of(&removed);
    assert_eq!(
        d["summary"]["rules_removed"][0]["rule_id"].as_str(),
        Some(id.as_str()),
        "{d}"
    );
    assert!(d["map_operations"].as_u64().unwrap() > 0, "{d}");
    // The open connection is tracked: it outlives the rule (no --revalidate).
    assert_eq!(
        d["flows_kept_no_longer_allowed"]
            .as_array()
            .map(|a| a.len()),
        Some(1),
        "{d}"
    );
    let human = String::from_utf8_lossy(
        &run(&t.db, &["diff", "--state", without.to_str().unwrap()]).stdout,
    )
    .to_string();
    assert!(human.contains("- rule") && human.contains(&id), "{human}");
    let bad = dir.path("bad.toml");
    std::fs::write(&bad, "[[security_group]]\nid = 5\n").unwrap();
    assert_eq!(
        run(&t.db, &["diff", "--state", bad.to_str().unwrap()])
            .status
            .code(),
        Some(1)
    );

    // The id survives an unrelated edit and a restart.
    let edited = base.replace("\"HTTP\"", "\"plain HTTP\"")
        + "\n[[security_group]]\nid = \"sg-0000000000000new\"\ningress = [{ protocol = \"udp\", ports = \"53\", from = [\"198.18.0.0/15\"] }]\n";
    let sha = write_state(&state, &edited);
    t.db.wait_applied(&sha, &mut agent);
    assert_eq!(db_rule(&t.db)["rule_id"].as_str(), Some(id.as_str()));
    agent.stop();
    let mut agent = t.db.start_agent(&state, &[], &dir.path("db2.log"));
    t.db.wait_applied(&sha, &mut agent);
    assert_eq!(db_rule(&t.db)["rule_id"].as_str(), Some(id.as_str()));
    let log = agent.log_text();
    drop(agent);
    let first_log = std::fs::read_to_string(dir.path("db.log")).unwrap_or_default();
    assert!(
        first_log.contains("change: ") && first_log.contains("+groups 1 [sg-0000000000000new]"),
        "the log names what changed:\n{first_log}\n{log}"
    );
}

/// Flow log fields of the tests' custom format (version 5, with sg's own fields).
const FLOW_FORMAT: &str = "${version} ${account-id} ${interface-id} ${srcaddr} ${dstaddr} ${srcport} ${dstport} ${protocol} ${packets} ${bytes} ${start} ${end} ${action} ${log-status} ${flow-direction} ${sg-group-id} ${sg-rule-id} ${sg-reason}";

/// The two tiers, the database also taking UDP 5353 from the web subnet (a tracked
/// flow), owned by an account.
fn observed_state(audit: bool) -> String {
    example("two-tier.toml")
        .replace(
            "{ protocol = \"tcp\", ports = \"3306\", from = [\"sg-0a00000000000web\"], description = \"MySQL from web servers\" },",
            "{ protocol = \"tcp\", ports = \"3306\", from = [\"sg-0a00000000000web\"], description = \"MySQL from web servers\" },\n  { protocol = \"udp\", ports = \"5353\", from = [\"198.18.1.0/24\"] },",
        )
        .replace(
            "groups = [\"sg-0a000000000000db\"]",
            &format!("groups = [\"sg-0a000000000000db\"]\nowner_id = \"123456789012\"\naudit = {audit}"),
        )
}

fn udp_echo(h: &Host, addr: &str) {
    let sock = h.ns.udp_bind(addr.parse().unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
}

/// Sends `count` datagrams of `size` bytes from `h` to `to`; returns the echoes received.
fn udp_send(h: &Host, to: &str, count: usize, size: usize) -> usize {
    let to: std::net::SocketAddr = to.parse().unwrap();
    h.ns.enter(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let payload = vec![7u8; size];
        let mut echoed = 0;
        for _ in 0..count {
            s.send_to(&payload, to).expect("send");
            let mut buf = [0u8; 2048];
            if s.recv_from(&mut buf).is_ok() {
                echoed += 1;
            }
        }
        echoed
    })
}

/// `count` datagrams from `h` to `to`, each from a socket of its own (a flow each);
/// returns the echoes received.
fn udp_flows(h: &Host, to: &str, count: usize) -> usize {
    (0..count).map(|_| udp_send(h, to, 1, 100)).sum()
}

/// Flow log records (custom format) as field vectors.
fn records(path: &std::path::Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').map(String::from).collect())
        .collect()
}

/// (packets, bytes) summed over records matching src, dst, dstport, action, direction.
fn total(
    recs: &[Vec<String>],
    src: &str,
    dst: &str,
    dport: &str,
    action: &str,
    dir: &str,
) -> (u64, u64) {
    recs.iter()
        .filter(|r| {
            r.len() == 18
                && r[3] == src
                && r[4] == dst
                && r[6] == dport
                && r[12] == action
                && r[14] == dir
        })
        .fold((0, 0), |(p, b), r| {
            (
                p + r[8].parse::<u64>().unwrap(),
                b + r[9].parse::<u64>().unwrap(),
            )
        })
}

fn http_get(h: &Host, addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = tcp::connect(&h.ns, addr, None, Duration::from_secs(2)).expect("API");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Every UDP frame of `payload` bytes: Ethernet, IPv4 and UDP headers (the bytes flow
/// logs count, as conntrack does).
fn udp_frame(payload: u64) -> u64 {
    14 + 20 + 8 + payload
}

#[test]
fn flow_logs_metrics_and_monitor_see_real_traffic() {
    if !require_root("flow_logs_metrics_and_monitor_see_real_traffic") {
        return;
    }
    let t = Lab::two_tier();
    udp_echo(&t.db, "0.0.0.0:5353");
    let dir = TempDir::new("flowlog");
    let state = dir.path("state.toml");
    let sha = write_state(&state, &observed_state(false));
    let flow_log = dir.path("flow.log");
    let mut agent = t.db.start_agent(
        &state,
        &[
            "--flow-log",
            flow_log.to_str().unwrap(),
            "--flow-log-interval",
            "1",
            "--flow-log-format",
            FLOW_FORMAT,
            "--api",
            "127.0.0.1:9464",
        ],
        &dir.path("db.log"),
    );
    t.db.wait_applied(&sha, &mut agent);
    // Two monitors: everything, and drops only.
    let spawn_monitor = |args: &[&str]| {
        let mut child =
            t.db.cmd(agent_bin())
                .args(["monitor", "--json"])
                .args(args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("monitor");
        let out = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&l) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        (child, lines)
    };
    let (mut all_mon, all_events) = spawn_monitor(&[]);
    let (mut drops_mon, drop_events) = spawn_monitor(&["--drops"]);
    std::thread::sleep(Duration::from_millis(500));

    // Allowed: 7 datagrams of 200 bytes from web1, echoed. Denied: 5 of 100 bytes from the
    // outsider. And one TCP connection to the database.
    assert_eq!(udp_send(&t.web1, "198.18.2.21:5353", 7, 200), 7);
    assert_eq!(udp_send(&t.outsider, "198.18.2.21:5353", 5, 100), 0);
    assert!(tcp::reaches(&t.web1.ns, "198.18.2.21:3306"));
    let udp_rule = json_of(&run(&t.db, &["policy", "--json"]))["interfaces"][0]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ports"] == "5353")
        .expect("the udp rule")["rule_id"]
        .as_str()
        .unwrap()
        .to_string();
    let want_in = (7, 7 * udp_frame(200));
    sg_tests::wait_for("the flow log records", Duration::from_secs(15), || {
        let r = records(&flow_log);
        (total(
            &r,
            "198.18.1.11",
            "198.18.2.21",
            "5353",
            "ACCEPT",
            "ingress",
        ) == want_in
            && total(
                &r,
                "198.18.200.1",
                "198.18.2.21",
                "5353",
                "REJECT",
                "ingress",
            ) == (5, 5 * udp_frame(100))
            && total(
                &r,
                "198.18.1.11",
                "198.18.2.21",
                "3306",
                "ACCEPT",
                "ingress",
            )
            .0 > 0)
            .then_some(())
    });
    let recs = records(&flow_log);
    let text = std::fs::read_to_string(&flow_log).unwrap();
    // The replies, the other direction of the same flow.
    assert_eq!(
        total(&recs, "198.18.2.21", "198.18.1.11", "", "ACCEPT", "egress").0,
        0,
        "egress records name the source port as their destination port"
    );
    let replies: u64 = recs
        .iter()
        .filter(|r| {
            r.len() == 18
                && r[3] == "198.18.2.21"
                && r[4] == "198.18.1.11"
                && r[5] == "5353"
                && r[12] == "ACCEPT"
                && r[14] == "egress"
        })
        .map(|r| r[8].parse::<u64>().unwrap())
        .sum();
    assert_eq!(replies, 7, "{text}");
    let accept = recs
        .iter()
        .find(|r| r.len() == 18 && r[6] == "5353" && r[12] == "ACCEPT")
        .unwrap();
    assert_eq!(
        (
            &accept[0][..],
            &accept[1][..],
            &accept[2][..],
            &accept[7][..],
            &accept[13][..]
        ),
        ("5", "123456789012", DB_ENI, "17", "OK"),
        "{text}"
    );
    assert_eq!(
        (&accept[15][..], &accept[16][..]),
        ("sg-0a000000000000db", udp_rule.as_str())
    );
    let reject = recs
        .iter()
        .find(|r| r.len() == 18 && r[12] == "REJECT")
        .unwrap();
    assert_eq!(
        (&reject[15][..], &reject[16][..], &reject[17][..]),
        ("-", "-", "no-rule"),
        "{text}"
    );
    let start: u64 = accept[10].parse().unwrap();
    let end: u64 = accept[11].parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        start <= end && end <= now && now - start < 60,
        "{start} {end} {now}"
    );
    let tcp_accept = recs
        .iter()
        .find(|r| r.len() == 18 && r[6] == "3306" && r[12] == "ACCEPT" && r[14] == "ingress")
        .unwrap_or_else(|| panic!("a tcp record: {text}"));
    assert_eq!(&tcp_accept[16], db_rule(&t.db)["rule_id"].as_str().unwrap());

    // Monitors: the admission and the denials, with rule and reason.
    sg_tests::wait_for("monitor events", Duration::from_secs(5), || {
        let events = all_events.lock().unwrap();
        let admitted = events.iter().any(|e| {
            e["verdict"] == "admitted"
                && e["local_port"] == 5353
                && e["rule_id"] == udp_rule.as_str()
        });
        let denied = events
            .iter()
            .filter(|e| {
                e["verdict"] == "denied"
                    && e["reason"] == "no-rule"
                    && e["remote"] == "198.18.200.1"
            })
            .count();
        (admitted && denied == 5).then_some(())
    });
    {
        let drops = drop_events.lock().unwrap();
        // (The hosts' own IGMP reports are denied too.)
        let outsider: Vec<_> = drops
            .iter()
            .filter(|e| e["remote"] == "198.18.200.1")
            .collect();
        assert_eq!(outsider.len(), 5, "{drops:?}");
        assert!(drops
            .iter()
            .all(|e| e["verdict"] == "denied" && e["network_interface"] == DB_ENI));
    }
    let _ = all_mon.kill();
    let _ = drops_mon.kill();
    let _ = all_mon.wait();
    let _ = drops_mon.wait();

    // Metrics: promtool is happy, and the values moved with the traffic.
    let body = http_get(&t.db, "127.0.0.1:9464", "/metrics");
    let prom = dir.path("metrics.txt");
    std::fs::write(&prom, &body).unwrap();
    let check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&prom).unwrap())
        .output()
        .expect("promtool (the bootstrap installs Debian's prometheus)");
    assert!(
        check.status.success() && check.stdout.is_empty() && check.stderr.is_empty(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let ingress = "direction=\"ingress\"";
    assert!(
        metric(
            &body,
            "sg_dropped_packets_total",
            &[ingress, "reason=\"policy\"", DB_ENI]
        ) >= 5,
        "{body}"
    );
    assert!(
        metric(
            &body,
            "sg_packets_total",
            &[ingress, "verdict=\"allowed_new\"", "interface=\"eth0\""]
        ) >= 2,
        "{body}"
    );
    assert!(
        metric(
            &body,
            "sg_bytes_total",
            &[ingress, "verdict=\"allowed_tracked\""]
        ) >= 6 * udp_frame(200),
        "{body}"
    );
    assert!(
        metric(
            &body,
            "sg_rule_hits_total",
            &[&format!("rule_id=\"{udp_rule}\"")]
        ) >= 1,
        "{body}"
    );
    assert!(
        metric(&body, "sg_flow_log_records_total", &[]) >= 3,
        "{body}"
    );
    // What the tables cost in kernel memory: 192 bytes per established entry.
    assert_eq!(
        metric(&body, "sg_map_memory_bytes", &["map=\"SG_CT_V2\""]) / 262_144,
        192,
        "{body}"
    );
    assert_eq!(
        metric(&body, "sg_conntrack_capacity", &["table=\"established\""]),
        262_144,
        "{}",
        body.lines()
            .filter(|l| l.contains("conntrack"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(metric(&body, "sg_state_applies_total", &[]) >= 1);
    assert!(body.contains("sg_build_info{version=\""), "{body}");

    // SIGHUP reopens the file (logrotate): new records go to the new file.
    let rotated = dir.path("flow.log.1");
    std::fs::rename(&flow_log, &rotated).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(udp_send(&t.web1, "198.18.2.21:5353", 3, 50), 3);
    sg_tests::wait_for(
        "records in the reopened file",
        Duration::from_secs(10),
        || {
            (total(
                &records(&flow_log),
                "198.18.1.11",
                "198.18.2.21",
                "5353",
                "ACCEPT",
                "ingress",
            )
            .0 == 3)
                .then_some(())
        },
    );

    // Audit mode on the interface: what would be denied passes, logged REJECT / audit,
    // once per flow (its reply opens a flow of its own, as egress allows it).
    let sha = write_state(&state, &observed_state(true));
    t.db.wait_applied(&sha, &mut agent);
    assert_eq!(
        udp_flows(&t.outsider, "198.18.2.21:5353", 4),
        4,
        "audit passes it"
    );
    sg_tests::wait_for("audit records", Duration::from_secs(10), || {
        let r = records(&flow_log);
        let audited = r
            .iter()
            .filter(|r| {
                r.len() == 18 && r[3] == "198.18.200.1" && r[12] == "REJECT" && r[17] == "audit"
            })
            .map(|r| r[8].parse::<u64>().unwrap())
            .sum::<u64>();
        (audited == 4).then_some(())
    });
    let st = t.db.status().unwrap();
    assert!(
        st["maps"].as_array().is_some_and(|m| m
            .iter()
            .any(|m| m["name"] == "SG_CT_SLOTS" && m["memory_bytes"].as_u64().unwrap_or(0) > 0)),
        "status lists each map's memory: {}",
        st["maps"]
    );
    assert_eq!(st["interfaces"][0]["audit"], true, "{st}");
    // Audit off again: dropped.
    let sha = write_state(&state, &observed_state(false));
    t.db.wait_applied(&sha, &mut agent);
    assert_eq!(
        udp_send(&t.outsider, "198.18.2.21:5353", 2, 100),
        0,
        "denied again"
    );
    // Stopping flushes the open interval.
    assert_eq!(udp_send(&t.web1, "198.18.2.21:5353", 2, 10), 2);
    agent.stop();
    let r = records(&flow_log);
    assert_eq!(
        total(
            &r,
            "198.18.1.11",
            "198.18.2.21",
            "5353",
            "ACCEPT",
            "ingress"
        )
        .0,
        5,
        "every open interval is flushed at stop"
    );
}

#[test]
fn audit_for_the_whole_agent_passes_and_logs_with_the_default_format() {
    if !require_root("audit_for_the_whole_agent_passes_and_logs_with_the_default_format") {
        return;
    }
    let t = Lab::two_tier();
    let dir = TempDir::new("audit");
    let state = dir.path("state.toml");
    let sha = write_state(&state, &example("two-tier.toml"));
    let flow_log = dir.path("flow.log");
    // Without audit, the outsider cannot reach the database.
    let mut agent = t.db.start_agent(&state, &[], &dir.path("db.log"));
    t.db.wait_applied(&sha, &mut agent);
    assert!(!tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"));
    agent.stop();
    let mut agent = t.db.start_agent(
        &state,
        &[
            "--audit",
            "--flow-log",
            flow_log.to_str().unwrap(),
            "--flow-log-interval",
            "1",
        ],
        &dir.path("db2.log"),
    );
    t.db.wait_applied(&sha, &mut agent);
    assert!(
        tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"),
        "audit passes it"
    );
    agent.stop();
    let text = std::fs::read_to_string(&flow_log).unwrap();
    // AWS's default format: 14 fields, version 2, REJECT for what audit passed.
    let reject = text
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|r| r[3] == "198.18.200.1" && r[12] == "REJECT")
        .unwrap_or_else(|| panic!("an audited record:\n{text}"));
    assert_eq!(reject.len(), 14, "{text}");
    assert_eq!(
        (reject[0], reject[1], reject[2], reject[6], reject[7], reject[13]),
        ("2", "-", DB_ENI, "3306", "6", "OK")
    );
    // Audit off: denied again.
    let mut agent = t.db.start_agent(&state, &[], &dir.path("db3.log"));
    t.db.wait_applied(&sha, &mut agent);
    assert!(!tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"));
}
