//! State files in both formats: the examples parse to the same state, and a corpus of bad
//! inputs is rejected with messages that name the file, the object and the field.

use sg_agent::{
    model::{Direction, Peer, PortMatch, Protocol},
    source::{load_file, parse_str},
};

fn example(name: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(name),
    )
    .unwrap()
}

#[test]
fn both_example_formats_describe_the_same_state() {
    let native = parse_str(&example("two-tier.toml")).unwrap();
    let aws = parse_str(&example("two-tier.json")).unwrap();
    assert_eq!(native.network_interfaces, aws.network_interfaces);
    assert_eq!(native.security_groups.len(), aws.security_groups.len());
    for (a, b) in native.security_groups.iter().zip(&aws.security_groups) {
        assert_eq!((&a.id, &a.name), (&b.id, &b.name));
        for dir in Direction::BOTH {
            let strip = |rules: &[sg_agent::model::Rule]| {
                rules
                    .iter()
                    .map(|r| (r.protocol, r.ports, r.peers.clone()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(strip(a.rules(dir)), strip(b.rules(dir)), "{} {dir}", a.id);
        }
    }
    let db = &native.security_groups[1];
    assert_eq!(
        db.ingress[0].peers,
        vec![Peer::Group("sg-0a00000000000web".into())]
    );
    assert_eq!(
        db.ingress[0].ports,
        PortMatch::Ports {
            from: 3306,
            to: 3306
        }
    );
    assert_eq!(
        db.egress[0].protocol,
        Protocol::All,
        "absent egress in the native format is the default rule"
    );
}

#[test]
fn aws_json_semantics() {
    let s = parse_str(
        r#"{"SecurityGroups":[{"GroupId":"sg-1","GroupName":"g","SomethingNew":1,
            "IpPermissions":[
              {"IpProtocol":"icmp","FromPort":8,"ToPort":-1,"IpRanges":[{"CidrIp":"198.18.0.0/16"}]},
              {"IpProtocol":"-1","PrefixListIds":[{"PrefixListId":"pl-1"}]},
              {"IpProtocol":"50","FromPort":-1,"ToPort":-1,"Ipv6Ranges":[{"CidrIpv6":"2001:db8::/32"}]},
              {"IpProtocol":"udp","FromPort":0,"ToPort":65535,"UserIdGroupPairs":[{"GroupId":"sg-1"}]}]}],
           "ManagedPrefixLists":[{"PrefixListId":"pl-1","AddressFamily":"IPv4","Entries":[{"Cidr":"198.19.0.0/16"}]}]}"#,
    )
    .unwrap();
    let g = &s.security_groups[0];
    assert!(
        g.egress.is_empty(),
        "absent IpPermissionsEgress means no egress rules"
    );
    assert_eq!(
        g.ingress[0].ports,
        PortMatch::Icmp {
            icmp_type: Some(8),
            code: None
        }
    );
    assert_eq!(g.ingress[1].peers, vec![Peer::PrefixList("pl-1".into())]);
    assert_eq!(g.ingress[2].protocol, Protocol::Number(50));
    assert_eq!(g.ingress[3].ports, PortMatch::Ports { from: 0, to: 65535 });
    assert!(
        s.network_interfaces.is_empty(),
        "a missing list is an empty list"
    );
}

/// The bad-input corpus (`tests/bad-inputs/`, both formats): each file is refused, and
/// what `validate` prints is exactly its `.expected` file, every error in file order,
/// named in the user's terms, with lines. `SG_BLESS=1` writes the `.expected` files from
/// what the code says now (then read every one before committing them).
#[test]
fn bad_inputs_are_rejected_with_exactly_the_expected_messages() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-inputs");
    let bless = std::env::var_os("SG_BLESS").is_some();
    let mut cases: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/bad-inputs")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("toml" | "json")
            )
        })
        .collect();
    cases.sort();
    assert!(cases.len() >= 80, "{} cases", cases.len());
    let (mut native, mut aws) = (0, 0);
    let mut wrong = Vec::new();
    for case in &cases {
        if case.extension().is_some_and(|e| e == "json") {
            aws += 1;
        } else {
            native += 1;
        }
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let got = match load_file(case) {
            Ok(_) => "accepted\n".to_string(),
            Err(e) => {
                let text = e.to_string().replace(&case.display().to_string(), &name);
                format!("{text}\n")
            }
        };
        assert!(
            !got.contains("StrOrInt") && !got.contains("untagged") && !got.contains(" i64"),
            "{name}: a Rust type name in the message:\n{got}"
        );
        let expected_path = case.with_extension("expected");
        if bless {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        if got != want {
            wrong.push(format!("{name}:\n--- want\n{want}--- got\n{got}"));
        }
    }
    assert!(
        native >= 40 && aws >= 40,
        "{native} native, {aws} AWS JSON cases"
    );
    assert!(
        wrong.is_empty(),
        "{} of {} cases differ:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}

/// The AWS JSON writer is the parser's inverse: a state written and read back is the
/// same state, up to what AWS JSON cannot say (settings and per-interface timeouts, the
/// order of a rule's peers across kinds, an address listed twice), and writing is
/// canonical (equal states, equal bytes).
#[test]
fn aws_json_written_then_parsed_is_the_same_state() {
    use sg_agent::{source::to_aws_json, testgen};
    let strip = |mut s: sg_agent::model::State| {
        s.settings = Default::default();
        for n in &mut s.network_interfaces {
            n.timeouts.clear();
            let mut seen = std::collections::BTreeSet::new();
            n.ipv4.retain(|a| seen.insert(*a));
        }
        for g in &mut s.security_groups {
            for r in g.ingress.iter_mut().chain(g.egress.iter_mut()) {
                r.peers.sort_by_key(|p| format!("{p:?}"));
                // EC2 writes "every port" and "every type" out.
                if r.ports == PortMatch::Any && r.protocol.has_ports() {
                    r.ports = PortMatch::Ports { from: 0, to: 65535 };
                }
                if r.ports == PortMatch::Any && r.protocol.is_icmp() {
                    r.ports = PortMatch::Icmp {
                        icmp_type: None,
                        code: None,
                    };
                }
            }
        }
        s
    };
    let mut cases = vec![parse_str(&example("two-tier.toml")).expect("example")];
    let mut rng = testgen::Rng::new(7);
    for _ in 0..200 {
        cases.push(testgen::state(&mut rng, 6));
    }
    for state in cases {
        let state = strip(state);
        let json = to_aws_json(&state);
        let back = parse_str(&json).unwrap_or_else(|p| panic!("{p:#?}\n{json}"));
        assert_eq!(strip(back.clone()), state, "{json}");
        assert_eq!(to_aws_json(&back), json, "canonical bytes");
    }
}

/// A FIFO (or any file that is not regular) is refused at once instead of blocking
/// `validate` forever; a UTF-8 byte-order mark is ignored in both formats.
#[test]
fn fifos_are_refused_and_byte_order_marks_ignored() {
    let dir = std::env::temp_dir().join(format!("sg-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("state.toml");
    let _ = std::fs::remove_file(&fifo);
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let started = std::time::Instant::now();
    let err = load_file(&fifo).expect_err("a FIFO is not a state file");
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    assert!(err.to_string().contains("is not a regular file"), "{err}");
    for (name, text) in [
        ("bom.toml", example("two-tier.toml")),
        ("bom.json", example("two-tier.json")),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, format!("\u{feff}{text}")).unwrap();
        let with = load_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(with.state, parse_str(&text).unwrap(), "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
