//! A fleet following one etcd (SPEC §8), with real agents in namespaces and a real etcd
//! (Debian's 3.4) in a lab host of its own: the two tiers from etcd, publish's contract,
//! an ENI joining and leaving, an etcd crash during changes, a compacted revision.

use std::{
    process::Output,
    time::{Duration, Instant},
};

use sg_tests::{
    etcd::{revision_of, Etcd},
    lab::{example, tcp, write_state, AgentProc, Host, Lab, TempDir, WEB3_MAC},
    privileges::require_root,
    wait_for,
};

fn publish(etcd: &Etcd, file: &std::path::Path, extra: &[&str]) -> Output {
    etcd.publish(file, extra)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `sg-agent run --etcd URL` on `h`.
fn start_agent(h: &Host, etcd: &Etcd, log: &std::path::Path) -> AgentProc {
    h.run_agent(&["--etcd", &etcd.url()], log)
}

/// Waits until the agent on `h` has applied etcd's `revision` (or a later one).
fn wait_revision(h: &Host, agent: &mut AgentProc, revision: i64) -> serde_json::Value {
    h.wait_revision(revision, agent)
}

/// web3's interface alone: published with --merge, it references web-sg in etcd.
const WEB3: &str = r#"{"NetworkInterfaces": [{"NetworkInterfaceId": "eni-0000000000000web3", "MacAddress": "02:5e:00:00:01:03", "PrivateIpAddresses": [{"PrivateIpAddress": "198.18.1.13"}], "Groups": [{"GroupId": "sg-0a00000000000web"}]}]}"#;

#[test]
fn a_fleet_follows_etcd_publish_is_exact_and_an_eni_joins_and_leaves() {
    if !require_root("a_fleet_follows_etcd_publish_is_exact_and_an_eni_joins_and_leaves") {
        return;
    }
    let mut t = Lab::two_tier();
    let web3 = t.lab.host("web3", WEB3_MAC, &["198.18.1.13/16"]);
    let mut etcd = Etcd::start(&mut t.lab);
    let dir = TempDir::new("fleet");
    let state = dir.path("two-tier.json");
    write_state(&state, &example("two-tier.json"));

    // publish: validation first, then exactly the objects; a second publish writes
    // nothing; --dry-run writes nothing.
    let bad = dir.path("bad.json");
    std::fs::write(&bad, r#"{"SecurityGroups": [{"GroupId": "sg-1", "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 1, "ToPort": 99999, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}]}"#).unwrap();
    let o = publish(&etcd, &bad, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("nothing was published"), "{}", text(&o));
    let dry = publish(&etcd, &state, &["--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(
        text(&dry).contains("create /sg/v1/security-groups/sg-0a000000000000db"),
        "{}",
        text(&dry)
    );
    let first = publish(&etcd, &state, &[]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("published 5 object(s), deleted 0"),
        "{}",
        text(&first)
    );
    let again = publish(&etcd, &state, &[]);
    assert!(
        text(&again).contains("nothing to publish"),
        "{}",
        text(&again)
    );
    let rev = revision_of(&again);

    // Agents on web1 and db follow it: the two tiers are enforced.
    let mut db = start_agent(&t.db, &etcd, &dir.path("db.log"));
    let mut web1 = start_agent(&t.web1, &etcd, &dir.path("web1.log"));
    let st = wait_revision(&t.db, &mut db, rev);
    assert_eq!(st["source"]["kind"], "etcd");
    assert_eq!(st["source"]["connected"], true);
    wait_revision(&t.web1, &mut web1, rev);
    assert!(tcp::reaches(&t.web1.ns, "198.18.2.21:3306"));
    assert!(!tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"));
    assert!(
        !tcp::reaches(&web3.ns, "198.18.2.21:3306"),
        "web3 is not in web-sg yet"
    );
    assert!(tcp::reaches(&t.outsider.ns, "198.18.1.11:80"));

    // web3 launches: one `publish --merge` of its interface; the database admits it.
    let part = dir.path("web3.json");
    std::fs::write(&part, WEB3).unwrap();
    let published = Instant::now();
    let o = publish(&etcd, &part, &["--merge"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("published 1 object(s)"), "{}", text(&o));
    wait_for(
        "web3 admitted to the database",
        Duration::from_secs(10),
        || tcp::reaches(&web3.ns, "198.18.2.21:3306").then_some(()),
    );
    eprintln!(
        "web3: first admitted connection {:?} after publish --merge",
        published.elapsed()
    );
    let log = std::fs::read_to_string(dir.path("db.log")).unwrap();
    assert!(
        log.contains("+members 1 [eni-0000000000000web3 in sg-0a00000000000web]"),
        "{log}"
    );
    // The watch response took the incremental path: no parse or compile of the whole state.
    assert!(
        log.contains("(membership of 1 network interfaces)"),
        "{log}"
    );

    // Leaving: the file without web3 would delete it: refused without --prune.
    let o = publish(&etcd, &state, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("/sg/v1/network-interfaces/eni-0000000000000web3"),
        "{}",
        text(&o)
    );
    assert!(
        tcp::reaches(&web3.ns, "198.18.2.21:3306"),
        "nothing was deleted"
    );
    let o = publish(&etcd, &state, &["--prune"]);
    assert!(text(&o).contains("deleted 1"), "{}", text(&o));
    let rev = revision_of(&o);
    wait_revision(&t.db, &mut db, rev);
    assert!(
        !tcp::reaches(&web3.ns, "198.18.2.21:3306"),
        "web3 left web-sg"
    );
    let log = std::fs::read_to_string(dir.path("db.log")).unwrap();
    assert_eq!(
        log.matches("(membership of 1 network interfaces)").count(),
        2,
        "joining and leaving both incremental: {log}"
    );

    // An invalid combined state (a merge that references nothing) is refused by publish;
    // written behind publish's back, the agents keep the last valid state.
    let broken = r#"{"NetworkInterfaces": [{"NetworkInterfaceId": "eni-x", "PrivateIpAddresses": [{"PrivateIpAddress": "198.18.9.9"}], "Groups": [{"GroupId": "sg-missing"}]}]}"#;
    let part = dir.path("broken.json");
    std::fs::write(&part, broken).unwrap();
    let o = publish(&etcd, &part, &["--merge"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("sg-missing"), "{}", text(&o));
    let client = sg_agent::source::etcd::Client::new(&etcd.url()).unwrap();
    let (ok, rev) = etcd
        .host
        .ns
        .enter(|| {
            client.txn(
                &[sg_agent::source::etcd::Op::Put {
                    key: "/sg/v1/network-interfaces/eni-x".into(),
                    value: serde_json::from_str::<serde_json::Value>(broken).unwrap()
                        ["NetworkInterfaces"][0]
                        .to_string(),
                }],
                &Default::default(),
            )
        })
        .expect("txn");
    assert!(ok);
    let st = wait_for(
        "the agent to report the invalid state",
        Duration::from_secs(10),
        || {
            let s = t.db.status()?;
            s["last_error"]
                .as_str()?
                .contains("sg-missing")
                .then_some(s)
        },
    );
    assert!(
        st["source"]["applied_revision"].as_i64().unwrap() < rev,
        "{st}"
    );
    assert!(
        tcp::reaches(&t.web1.ns, "198.18.2.21:3306"),
        "the last valid state stays"
    );
    assert!(!tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"));
    // Repaired by a publish: applied.
    let o = publish(&etcd, &state, &["--prune"]);
    let rev = revision_of(&o);
    let st = wait_revision(&t.db, &mut db, rev);
    assert!(st["last_error"].is_null(), "{st}");

    // etcd crashes: enforcement goes on with the last valid state, status says since
    // when; no map changes meanwhile; back, it resumes from its revision.
    let ops_before = t.db.status().unwrap()["stats"]["map_operations"]
        .as_u64()
        .unwrap();
    etcd.kill();
    let st = wait_for(
        "status to say disconnected",
        Duration::from_secs(10),
        || {
            let s = t.db.status()?;
            (s["source"]["connected"] == false).then_some(s)
        },
    );
    assert!(
        st["source"]["disconnected_since_unix"].as_u64().is_some(),
        "{st}"
    );
    assert!(tcp::reaches(&t.web1.ns, "198.18.2.21:3306"));
    assert!(!tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        t.db.status().unwrap()["stats"]["map_operations"]
            .as_u64()
            .unwrap(),
        ops_before,
        "no map change while etcd is down"
    );
    // A restarted agent enforces the pinned state at once, even with etcd down.
    db.stop();
    let mut db = start_agent(&t.db, &etcd, &dir.path("db2.log"));
    // Its start verifies three programs: 11 s for one agent on a busy day (a deadline only
    // bounds a failure).
    wait_for("the restarted agent", Duration::from_secs(90), || {
        let s = t.db.status()?;
        (s["agent_pid"].as_u64() == Some(db.child.id() as u64)).then_some(())
    });
    assert!(!tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"));
    assert!(tcp::reaches(&t.web1.ns, "198.18.2.21:3306"));
    etcd.run();
    let part = dir.path("web3.json");
    std::fs::write(&part, WEB3).unwrap();
    let o = publish(&etcd, &part, &["--merge"]);
    assert!(o.status.success(), "{}", text(&o));
    let rev = revision_of(&o);
    let st = wait_revision(&t.db, &mut db, rev);
    assert_eq!(st["source"]["connected"], true, "{st}");
    wait_for(
        "web3 admitted after etcd came back",
        Duration::from_secs(10),
        || tcp::reaches(&web3.ns, "198.18.2.21:3306").then_some(()),
    );
    // Compaction while an agent is stopped: it lists again and applies the deletion.
    db.stop();
    let o = publish(&etcd, &state, &["--prune"]);
    assert!(text(&o).contains("deleted 1"), "{}", text(&o));
    let rev = revision_of(&o);
    let client = sg_agent::source::etcd::Client::new(&etcd.url()).unwrap();
    etcd.host
        .ns
        .enter(|| client.compact(rev))
        .expect("compaction");
    assert!(
        tcp::reaches(&web3.ns, "198.18.2.21:3306"),
        "the stopped agent's pins still admit web3"
    );
    let mut db = start_agent(&t.db, &etcd, &dir.path("db3.log"));
    wait_revision(&t.db, &mut db, rev);
    assert!(
        !tcp::reaches(&web3.ns, "198.18.2.21:3306"),
        "the deletion is applied after the relist"
    );
    drop(web1);
    drop(db);
    let _ = etcd.log();
}

#[test]
fn a_compacted_revision_and_a_concurrent_publish_are_handled() {
    if !require_root("a_compacted_revision_and_a_concurrent_publish_are_handled") {
        return;
    }
    let mut lab = Lab::new();
    let etcd = Etcd::start(&mut lab);
    let client = sg_agent::source::etcd::Client::new(&etcd.url()).unwrap();
    let put = |k: &str, v: &str, expect: i64| {
        let mut e = std::collections::BTreeMap::new();
        e.insert(k.to_string(), expect);
        etcd.host.ns.enter(|| {
            client.txn(
                &[sg_agent::source::etcd::Op::Put {
                    key: k.into(),
                    value: v.into(),
                }],
                &e,
            )
        })
    };
    let (ok, r1) = put("/sg/v1/security-groups/a", "1", 0).unwrap();
    assert!(ok);
    // A guarded write with a stale revision is refused: how publish detects a
    // concurrent publisher.
    let (ok, _) = put("/sg/v1/security-groups/a", "2", 0).unwrap();
    assert!(!ok, "a stale guard must fail");
    let (ok, r2) = put("/sg/v1/security-groups/a", "3", r1).unwrap();
    assert!(ok);
    // Listing pages through a prefix at one revision.
    for i in 0..25 {
        put(&format!("/sg/v1/network-interfaces/eni-{i:02}"), "{}", 0).unwrap();
    }
    let (rev, kvs) = etcd.host.ns.enter(|| client.list("/sg/", 10)).unwrap();
    assert_eq!(kvs.len(), 26);
    assert!(rev > r2);
    // After a compaction, a watch from an older revision says so (the agent lists again).
    etcd.host.ns.enter(|| client.compact(rev)).unwrap();
    let r = etcd.host.ns.enter(|| client.watch("/sg/", r1, |_| true));
    assert!(
        matches!(r, Err(sg_agent::source::etcd::EtcdError::Compacted(_))),
        "{r:?}"
    );
    // A watch from the current revision sees a deletion as a deletion.
    let mut seen = vec![];
    etcd.host.ns.enter(|| {
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                let mut e = std::collections::BTreeMap::new();
                e.insert("/sg/v1/network-interfaces/eni-00".to_string(), 0);
                let _ = client.txn(
                    &[sg_agent::source::etcd::Op::Delete {
                        key: "/sg/v1/network-interfaces/eni-00".into(),
                    }],
                    &{
                        let (_, kvs) = client.list("/sg/v1/network-interfaces/eni-00", 1).unwrap();
                        kvs.into_iter()
                            .map(|(k, kv)| (k, kv.mod_revision))
                            .collect()
                    },
                );
                drop(e);
            });
            let _ = client.watch("/sg/", rev + 1, |c| {
                seen.extend(c.changes);
                false
            });
        })
    });
    assert_eq!(
        seen,
        vec![("/sg/v1/network-interfaces/eni-00".to_string(), None)]
    );
}

#[test]
fn tls_with_client_certificates_and_a_read_only_role_for_agents() {
    if !require_root("tls_with_client_certificates_and_a_read_only_role_for_agents") {
        return;
    }
    let mut t = Lab::two_tier();
    let etcd = Etcd::start_tls(&mut t.lab);
    let certs = etcd.certs();
    std::fs::write(certs.join("root.password"), "root-secret\n").unwrap();
    std::fs::write(certs.join("agent.password"), "agent-secret\n").unwrap();
    // Users and roles (etcdctl speaks gRPC, where the certificate's CN is the user):
    // agents get read access to the prefix only.
    for args in [
        &["user", "add", "root", "--new-user-password=root-secret"][..],
        &["role", "add", "sg-reader"],
        &[
            "role",
            "grant-permission",
            "sg-reader",
            "read",
            "/sg/",
            "--prefix=true",
        ],
        &[
            "user",
            "add",
            "sg-agent",
            "--new-user-password=agent-secret",
        ],
        &["user", "grant-role", "sg-agent", "sg-reader"],
        &["auth", "enable"],
    ] {
        let o = etcd.etcdctl(args);
        assert!(o.status.success(), "etcdctl {args:?}: {}", text(&o));
    }
    let dir = TempDir::new("fleet-tls");
    let state = dir.path("two-tier.json");
    write_state(&state, &example("two-tier.json"));
    let creds = |who: &str| -> Vec<String> {
        let user = if who == "agent" { "sg-agent" } else { who };
        vec![
            format!("--etcd-ca={}", certs.join("ca.crt").display()),
            format!("--etcd-cert={}", certs.join(format!("{who}.crt")).display()),
            format!("--etcd-key={}", certs.join(format!("{who}.key")).display()),
            format!("--etcd-user={user}"),
            format!(
                "--etcd-password-file={}",
                certs.join(format!("{who}.password")).display()
            ),
        ]
    };
    let as_args = |v: &[String]| -> Vec<String> { v.to_vec() };
    let publish_as = |who: &str, file: &std::path::Path, extra: &[&str]| {
        let c = as_args(&creds(who));
        let mut args: Vec<&str> = c.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        etcd.publish(file, &args)
    };
    // Without a client certificate, etcd refuses the connection.
    let o = etcd.publish(
        &state,
        &[&format!("--etcd-ca={}", certs.join("ca.crt").display())],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // The agents' read-only user cannot write.
    let o = publish_as("agent", &state, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("permission denied"), "{}", text(&o));
    // The publisher (root) can.
    let o = publish_as("root", &state, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let rev = revision_of(&o);
    // An agent follows with the read-only user over TLS.
    let c = creds("agent");
    let mut args: Vec<&str> = vec!["--etcd"];
    let url = etcd.url();
    args.push(&url);
    args.extend(c.iter().map(String::as_str));
    let mut db = t.db.run_agent(&args, &dir.path("db.log"));
    let st = t.db.wait_revision(rev, &mut db);
    assert_eq!(
        st["source"]["endpoints"][0], "https://198.18.250.1:2379",
        "{st}"
    );
    assert!(tcp::reaches(&t.web1.ns, "198.18.2.21:3306"));
    assert!(!tcp::reaches(&t.outsider.ns, "198.18.2.21:3306"));
    // A change published by root reaches it through its watch.
    let part = dir.path("web3.json");
    std::fs::write(&part, WEB3).unwrap();
    let o = publish_as("root", &part, &["--merge"]);
    assert!(o.status.success(), "{}", text(&o));
    t.db.wait_revision(revision_of(&o), &mut db);
}

/// The content digest of etcd's state under /sg/ now, and the revision it is at.
fn etcd_content(etcd: &Etcd) -> (String, i64) {
    let client = etcd.client_as("root", false);
    let (revision, kvs) = etcd
        .host
        .ns
        .enter(|| client.list("/sg/", 1000))
        .expect("list");
    let kvs = kvs.into_iter().map(|(k, kv)| (k, kv.value)).collect();
    // The content digest the agent reports for etcd (docs/fleet.md).
    let digest = sg_agent::source::etcd::Digest::of("/sg/", &kvs);
    (digest.hex(), revision)
}

#[test]
fn after_random_publishes_the_agent_applies_exactly_what_etcd_holds() {
    if !require_root("after_random_publishes_the_agent_applies_exactly_what_etcd_holds") {
        return;
    }
    let mut lab = Lab::new();
    let host = lab.host("agent", "02:5e:00:00:0a:01", &["198.18.10.1/16"]);
    let etcd = Etcd::start(&mut lab);
    let dir = TempDir::new("fleet-prop");
    let mut rng = sg_agent::testgen::Rng::new(0x0005_eedf_1ee7);
    let file = dir.path("state.json");
    let mut agent: Option<AgentProc> = None;
    let mut published = 0;
    for round in 0..12 {
        let interfaces = 1 + rng.below(6) as usize;
        let state = sg_agent::testgen::state(&mut rng, interfaces);
        std::fs::write(&file, sg_agent::source::to_aws_json(&state)).unwrap();
        // Mostly whole states (pruning what they no longer have), sometimes a merge,
        // which publish may refuse when the merged state would be invalid.
        let o = if round == 0 || rng.chance(70) {
            publish(&etcd, &file, &["--prune"])
        } else {
            publish(&etcd, &file, &["--merge"])
        };
        let out = text(&o);
        assert!(
            o.status.success() || out.contains("nothing was published"),
            "round {round}: {out}"
        );
        published += o.status.success() as u32;
        if agent.is_none() {
            agent = Some(host.run_agent(&["--etcd", &etcd.url()], &dir.path("agent.log")));
        }
        let a = agent.as_mut().unwrap();
        let (sha, revision) = etcd_content(&etcd);
        let st = host.wait_revision(revision, a);
        assert_eq!(
            st["applied_state_sha256"].as_str(),
            Some(sha.as_str()),
            "round {round}: the agent applies exactly etcd's content at revision {revision}: {st}"
        );
    }
    assert!(published >= 8, "most publishes went through: {published}");
}

#[test]
fn concurrent_publishers_never_leave_a_mix() {
    if !require_root("concurrent_publishers_never_leave_a_mix") {
        return;
    }
    let mut lab = Lab::new();
    let etcd = Etcd::start(&mut lab);
    let dir = TempDir::new("fleet-race");
    let mut rng = sg_agent::testgen::Rng::new(0x00c0_ffee);
    // Four different states over the same ids: every publish guards the keys it read.
    let files: Vec<std::path::PathBuf> = (0..4)
        .map(|i| {
            let state = sg_agent::testgen::state(&mut rng, 4);
            let f = dir.path(&format!("state-{i}.json"));
            std::fs::write(&f, sg_agent::source::to_aws_json(&state)).unwrap();
            f
        })
        .collect();
    let mut conflicts = 0;
    for round in 0..3 {
        let outs: Vec<Output> = std::thread::scope(|s| {
            let handles: Vec<_> = files
                .iter()
                .map(|f| s.spawn(|| publish(&etcd, f, &["--prune"])))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for o in &outs {
            assert!(o.status.success(), "round {round}: {}", text(o));
            conflicts += text(o).matches("a concurrent change").count();
        }
        // What etcd holds is exactly one publisher's state, never a mix.
        let (sha, _) = etcd_content(&etcd);
        let shas: Vec<String> = files
            .iter()
            .map(|f| {
                let state =
                    sg_agent::source::parse_str(&std::fs::read_to_string(f).unwrap()).unwrap();
                let kvs = sg_agent::source::etcd::objects("/sg/", &state);
                sg_agent::source::etcd::Digest::of("/sg/", &kvs).hex()
            })
            .collect();
        assert!(
            shas.contains(&sha),
            "round {round}: etcd holds one of the states: {}",
            outs.iter().map(text).collect::<Vec<_>>().join("\n")
        );
    }
    eprintln!("concurrent publishers: {conflicts} conflicts detected and re-planned");
}
