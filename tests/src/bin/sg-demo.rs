//! `cargo xtask demo`: the two-tier scenario enforced for real. Builds hosts as network
//! namespaces on a bridge, runs one sg-agent per server host with the same state file (each
//! finds its own interface by MAC, as on a VM), sends real traffic, prints a verification
//! table, then scales the web tier and times the new server's first admitted connection
//! to the database. Exits 0 only when every observed verdict is the expected one.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use sg_tests::{
    etcd::{revision_of, Etcd},
    lab::{agent_bin, tcp, write_state, AgentProc, Host, Lab, TempDir},
    privileges::require_root,
    wait_for,
};

struct Check {
    flow: String,
    expected: bool,
    observed: bool,
}

fn main() -> ExitCode {
    let keep = std::env::args().any(|a| a == "--keep");
    // --etcd: every server's agent follows one etcd (SPEC §8); web3's launch is one
    // `publish --merge`.
    let fleet = std::env::args().any(|a| a == "--etcd");
    if !require_root("demo") {
        return ExitCode::FAILURE;
    }
    let started = Instant::now();
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let base =
        std::fs::read_to_string(examples.join("two-tier.toml")).expect("examples/two-tier.toml");

    println!(
        "== building the lab: internet, admin, web1, web2, db (and web3 for later) on one bridge"
    );
    let mut lab = Lab::new();
    let internet = lab.host(
        "internet",
        "02:5e:00:00:09:01",
        &["198.18.200.1/16", "2001:db8:200::1/32"],
    );
    let admin = lab.host(
        "admin",
        "02:5e:00:00:09:02",
        &["198.18.100.10/16", "2001:db8:100::10/32"],
    );
    let web1 = lab.host(
        "web1",
        "02:5e:00:00:01:01",
        &["198.18.1.11/16", "2001:db8:1::11/32"],
    );
    let web2 = lab.host(
        "web2",
        "02:5e:00:00:01:02",
        &["198.18.1.12/16", "2001:db8:1::12/32"],
    );
    let db = lab.host(
        "db",
        "02:5e:00:00:02:01",
        &["198.18.2.21/16", "2001:db8:2::21/32"],
    );
    let web3 = lab.host(
        "web3",
        "02:5e:00:00:01:03",
        &["198.18.1.13/16", "2001:db8:1::13/32"],
    );
    for w in [&web1, &web2, &web3] {
        for port in ["80", "443", "22"] {
            tcp::echo_server(&w.ns, &format!("[::]:{port}"));
        }
    }
    tcp::echo_server(&db.ns, "[::]:3306");
    tcp::echo_server(&db.ns, "[::]:22");
    tcp::echo_server(&internet.ns, "[::]:8080");
    wait_for("the lab", Duration::from_secs(10), || {
        tcp::reaches(&internet.ns, "198.18.2.21:3306").then_some(())
    });

    let dir = TempDir::new("demo");
    let state = dir.path("state.toml");
    let sha = write_state(&state, &base);
    let etcd = fleet.then(|| {
        println!(
            "== starting etcd ({}) in a host of its own, and publishing the state to it",
            sg_tests::etcd::ETCD_ADDR
        );
        let etcd = Etcd::start(&mut lab);
        let out = etcd.publish(&state, &[]);
        print!(
            "  sg-agent publish: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            out.status.success(),
            "publish: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let revision = revision_of(&out);
        (etcd, revision)
    });
    match &etcd {
        None => println!(
            "== starting one sg-agent per server, all with {}",
            state.display()
        ),
        Some((e, _)) => println!(
            "== starting one sg-agent per server, all following {}",
            e.url()
        ),
    }
    let servers: [&Host; 4] = [&web1, &web2, &db, &web3];
    // The database's agent also writes VPC Flow Logs (1 s intervals, to show them below).
    let flow_log = dir.path("db-flow.log");
    let db_args = [
        "--flow-log",
        flow_log.to_str().expect("path"),
        "--flow-log-interval",
        "1",
    ];
    let source: Vec<String> = match &etcd {
        None => vec!["--state".into(), state.to_str().expect("path").into()],
        Some((e, _)) => vec!["--etcd".into(), e.url()],
    };
    let mut agents: Vec<AgentProc> = servers
        .iter()
        .map(|h| {
            let mut args: Vec<&str> = source.iter().map(String::as_str).collect();
            if h.name == "db" {
                args.extend_from_slice(&db_args);
            }
            h.run_agent(&args, &dir.path(&format!("{}.log", h.name)))
        })
        .collect();
    for (h, a) in servers.iter().zip(agents.iter_mut()) {
        match &etcd {
            None => h.wait_applied(&sha, a),
            Some((_, revision)) => {
                h.wait_revision(*revision, a);
            }
        }
    }

    let mut checks = Vec::new();
    let run = |checks: &mut Vec<Check>, list: Vec<(&str, &Host, &str, bool)>| {
        let results: Vec<(String, bool, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = list
                .iter()
                .map(|(flow, from, to, expected)| {
                    s.spawn(move || (flow.to_string(), *expected, tcp::reaches(&from.ns, to)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (flow, expected, observed) in results {
            checks.push(Check {
                flow,
                expected,
                observed,
            });
        }
    };
    run(
        &mut checks,
        vec![
            ("internet → web1 tcp/80", &internet, "198.18.1.11:80", true),
            (
                "internet → web2 tcp/443",
                &internet,
                "198.18.1.12:443",
                true,
            ),
            (
                "internet → web1 tcp/80 (IPv6)",
                &internet,
                "[2001:db8:1::11]:80",
                true,
            ),
            (
                "internet → web2 tcp/443 (IPv6)",
                &internet,
                "[2001:db8:1::12]:443",
                true,
            ),
            (
                "internet → web1 tcp/22 (SSH)",
                &internet,
                "198.18.1.11:22",
                false,
            ),
            (
                "internet → web1 tcp/22 (SSH, IPv6)",
                &internet,
                "[2001:db8:1::11]:22",
                false,
            ),
            ("admin → web1 tcp/22 (SSH)", &admin, "198.18.1.11:22", true),
            (
                "admin → web2 tcp/22 (SSH, IPv6)",
                &admin,
                "[2001:db8:1::12]:22",
                true,
            ),
            ("web1 → db tcp/3306", &web1, "198.18.2.21:3306", true),
            (
                "web2 → db tcp/3306 (IPv6)",
                &web2,
                "[2001:db8:2::21]:3306",
                true,
            ),
            (
                "internet → db tcp/3306",
                &internet,
                "198.18.2.21:3306",
                false,
            ),
            (
                "internet → db tcp/3306 (IPv6)",
                &internet,
                "[2001:db8:2::21]:3306",
                false,
            ),
            ("admin → db tcp/3306", &admin, "198.18.2.21:3306", false),
            ("admin → db tcp/22 (SSH)", &admin, "198.18.2.21:22", false),
            (
                "web3 (not in web-sg yet) → db tcp/3306",
                &web3,
                "198.18.2.21:3306",
                false,
            ),
            (
                "db → internet tcp/8080 (outbound, replies stateful)",
                &db,
                "198.18.200.1:8080",
                true,
            ),
            (
                "web1 → internet tcp/8080 (outbound, IPv6)",
                &web1,
                "[2001:db8:200::1]:8080",
                true,
            ),
        ],
    );
    let icmp_denied = !internet.ping("198.18.2.21");
    checks.push(Check {
        flow: "internet → db ping (no ICMP rule)".into(),
        expected: false,
        observed: !icmp_denied,
    });
    checks.push(Check {
        flow: "db → internet ping (outbound, reply stateful)".into(),
        expected: true,
        observed: db.ping("198.18.200.1"),
    });

    let web3_interface = "[[interface]]\nid = \"eni-0000000000000web3\"\nmac = \"02:5e:00:00:01:03\"\nipv4 = [\"198.18.1.13\"]\nipv6 = [\"2001:db8:1::13\"]\ngroups = [\"sg-0a00000000000web\"]\n";
    let scaled = format!("{base}\n{web3_interface}");
    let changed = Instant::now();
    let (sha, revision) = match &etcd {
        None => {
            println!("== scaling the web tier: web3 joins web-sg in the state file");
            (write_state(&state, &scaled), 0)
        }
        Some((e, _)) => {
            println!("== scaling the web tier: web3 launches, one `sg-agent publish --merge` of its interface");
            let part = dir.path("web3.toml");
            std::fs::write(&part, web3_interface).expect("web3.toml");
            let out = e.publish(&part, &["--merge"]);
            print!(
                "  sg-agent publish --merge: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            assert!(
                out.status.success(),
                "publish --merge: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            (String::new(), revision_of(&out))
        }
    };
    let admitted = loop {
        if tcp::connect(&web3.ns, "198.18.2.21:3306", None, Duration::from_millis(5)).is_ok() {
            break Some(changed.elapsed());
        }
        if changed.elapsed() > Duration::from_secs(10) {
            break None;
        }
    };
    for (h, a) in servers.iter().zip(agents.iter_mut()) {
        match &etcd {
            None => h.wait_applied(&sha, a),
            Some(_) => {
                h.wait_revision(revision, a);
            }
        }
    }
    run(
        &mut checks,
        vec![
            (
                "web3 (now in web-sg) → db tcp/3306",
                &web3,
                "198.18.2.21:3306",
                true,
            ),
            (
                "web3 → db tcp/3306 (IPv6)",
                &web3,
                "[2001:db8:2::21]:3306",
                true,
            ),
            ("internet → web3 tcp/80", &internet, "198.18.1.13:80", true),
            (
                "internet → web3 tcp/22 (SSH)",
                &internet,
                "198.18.1.13:22",
                false,
            ),
            (
                "web1 → db tcp/3306 (unchanged)",
                &web1,
                "198.18.2.21:3306",
                true,
            ),
            (
                "internet → db tcp/3306 (unchanged)",
                &internet,
                "198.18.2.21:3306",
                false,
            ),
        ],
    );

    let word = |b: bool| if b { "ALLOW" } else { "DENY" };
    println!("\n{:<55} {:<9} {:<9}", "flow", "expected", "observed");
    let mut failures = 0;
    for c in &checks {
        let ok = c.expected == c.observed;
        failures += !ok as usize;
        println!(
            "{:<55} {:<9} {:<9} {}",
            c.flow,
            word(c.expected),
            word(c.observed),
            if ok { "ok" } else { "MISMATCH" }
        );
    }
    match admitted {
        Some(t) => println!(
            "\nweb3 joined web-sg: first admitted connection to the database {:.1} ms after {}",
            t.as_secs_f64() * 1000.0,
            if etcd.is_some() {
                "`sg-agent publish --merge` started (its own run included)"
            } else {
                "the state file changed"
            }
        ),
        None => {
            println!("\nweb3 joined web-sg: no admitted connection within 10 s");
            failures += 1;
        }
    }
    println!("\n== what the database's agent shows: `sg-agent policy`");
    let policy = db
        .cmd(agent_bin())
        .arg("policy")
        .output()
        .expect("sg-agent policy");
    print!("{}", String::from_utf8_lossy(&policy.stdout));
    std::thread::sleep(Duration::from_millis(1500));
    println!("\n== and its flow log (AWS VPC Flow Logs, version 2 default format), tcp/3306:");
    let records = std::fs::read_to_string(&flow_log).unwrap_or_default();
    for line in records
        .lines()
        .filter(|l| l.split(' ').nth(6) == Some("3306"))
        .take(8)
    {
        println!("  {line}");
    }
    println!(
        "{} checks, {} mismatches, {:.1} s",
        checks.len(),
        failures,
        started.elapsed().as_secs_f64()
    );
    if keep {
        println!("\n--keep: the lab stays up. Namespaces: `ip netns list | grep sg-`; run commands on a host with");
        println!(
            "  ip netns exec <namespace> <command>; the agents keep running until you kill them."
        );
        for a in agents {
            std::mem::forget(a);
        }
        for h in [internet, admin, web1, web2, db, web3] {
            std::mem::forget(h);
        }
        std::mem::forget(lab);
        std::mem::forget(dir);
    }
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
