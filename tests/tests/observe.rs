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
