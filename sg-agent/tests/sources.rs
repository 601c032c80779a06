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

/// (description, file extension, content, substrings every message must contain)
type Bad = (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
);

const GROUP: &str = "[[security_group]]\nid = \"sg-a\"\n";

fn corpus() -> Vec<(String, &'static str, String, Vec<&'static str>)> {
    let native: Vec<Bad> = vec![
        ("toml syntax error", "toml", "[[security_group]\nid = 1", &["syntax", ".toml:1:"]),
        ("unknown top-level key", "toml", "[[securitygroup]]\nid = \"x\"", &["securitygroup"]),
        ("unknown rule field", "toml", "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"tcp\", port = \"80\", from = [\"0.0.0.0/0\"] }]", &["port"]),
        ("unknown protocol", "toml", "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"tcpp\", ports = \"80\", from = [\"0.0.0.0/0\"] }]", &["security group sg-a", "ingress[0].protocol", "tcpp"]),
        ("protocol number too big", "toml", "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = 256, from = [\"0.0.0.0/0\"] }]", &["sg-a", "ingress[0].protocol", "256"]),
        ("port out of range", "toml", "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"tcp\", ports = \"70000\", from = [\"0.0.0.0/0\"] }]", &["sg-a", "ingress[0].ports", "70000"]),
        ("from > to", "toml", "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"tcp\", ports = \"90-80\", from = [\"0.0.0.0/0\"] }]", &["sg-a", "ingress[0].ports", "greater"]),
        ("ports on icmp", "toml", "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"icmp\", ports = \"80\", from = [\"0.0.0.0/0\"] }]", &["sg-a", "ingress[0].ports"]),
        ("icmp type on tcp", "toml", "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"tcp\", icmp_type = 8, from = [\"0.0.0.0/0\"] }]", &["sg-a", "ingress[0].icmp_type"]),
        ("icmp type out of range", "toml", "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"icmp\", icmp_type = 300, from = [\"0.0.0.0/0\"] }]", &["sg-a", "ingress[0].icmp_type", "300"]),
        ("icmp code without type", "toml", "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"icmp\", icmp_code = 3, from = [\"0.0.0.0/0\"] }]", &["sg-a", "ingress[0].icmp_code"]),
        ("bad cidr", "toml", "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"tcp\", ports = \"80\", from = [\"198.18.0.0/33\"] }]", &["sg-a", "ingress[0].from[0]", "198.18.0.0/33"]),
        ("cidr with host bits", "toml", "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"tcp\", ports = \"80\", from = [\"198.18.0.5/24\"] }]", &["sg-a", "ingress[0].from[0]", "host bits"]),
        ("bare address as peer", "toml", "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"tcp\", ports = \"80\", from = [\"198.18.0.5\"] }]", &["sg-a", "ingress[0].from[0]", "/32"]),
        ("unknown group reference", "toml", "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"tcp\", ports = \"80\", from = [\"sg-nope\"] }]", &["sg-a", "ingress[0].peers[0]", "sg-nope"]),
        ("unknown prefix list", "toml", "[[security_group]]\nid = \"sg-a\"\negress = [{ protocol = \"all\", to = [\"pl-nope\"] }]", &["sg-a", "egress[0].peers[0]", "pl-nope"]),
        ("rule without peers", "toml", "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"all\" }]", &["sg-a", "ingress[0].from"]),
        ("egress rule using from", "toml", "[[security_group]]\nid = \"sg-a\"\negress = [{ protocol = \"all\", from = [\"0.0.0.0/0\"] }]", &["sg-a", "egress[0].from"]),
        ("duplicate group id", "toml", "[[security_group]]\nid = \"sg-a\"\n[[security_group]]\nid = \"sg-a\"", &["security group sg-a", "id", "duplicate"]),
        ("duplicate interface id", "toml", "[[interface]]\nid = \"eni-1\"\n[[interface]]\nid = \"eni-1\"", &["network interface eni-1", "id", "duplicate"]),
        ("interface with unknown group", "toml", "[[interface]]\nid = \"eni-1\"\ngroups = [\"sg-x\"]", &["network interface eni-1", "groups[0]", "sg-x"]),
        ("interface bad ipv4", "toml", "[[interface]]\nid = \"eni-1\"\nipv4 = [\"198.18.0.300\"]", &["network interface eni-1", "ipv4[0]"]),
        ("interface bad ipv6", "toml", "[[interface]]\nid = \"eni-1\"\nipv6 = [\"2001:db8::zz\"]", &["network interface eni-1", "ipv6[0]"]),
        ("interface bad mac", "toml", "[[interface]]\nid = \"eni-1\"\nmac = \"02:00:00:00:00\"", &["network interface eni-1", "mac"]),
        ("two interfaces, one mac", "toml", "[[interface]]\nid = \"eni-1\"\nmac = \"02:00:00:00:00:01\"\n[[interface]]\nid = \"eni-2\"\nmac = \"02:00:00:00:00:01\"", &["mac", "eni-1"]),
        ("too many groups", "toml", "", &["groups", "at most 16"]),
        ("prefix list family mismatch", "toml", "[[security_group]]\nid = \"sg-a\"\n[[prefix_list]]\nid = \"pl-1\"\nfamily = \"ipv4\"\nentries = [\"2001:db8::/32\"]", &["prefix list pl-1", "entries[0]"]),
        ("prefix list bad family", "toml", "[[security_group]]\nid = \"sg-a\"\n[[prefix_list]]\nid = \"pl-1\"\nfamily = \"ipx\"", &["prefix list pl-1", "family"]),
        ("unknown timeout", "toml", "[settings.timeouts]\ntcp_forever = 5\n[[security_group]]\nid = \"sg-a\"", &["settings", "timeouts.tcp_forever"]),
        ("zero timeout", "toml", "[[interface]]\nid = \"eni-1\"\ntimeouts = { udp = 0 }", &["network interface eni-1", "timeouts.udp"]),
    ];
    let aws: Vec<Bad> = vec![
        (
            "json syntax error",
            "json",
            "{\"SecurityGroups\": [",
            &["syntax", "line"],
        ),
        (
            "aws unknown protocol",
            "json",
            r#"{"SecurityGroups":[{"GroupId":"sg-1","IpPermissions":[{"IpProtocol":"tcpx","FromPort":1,"ToPort":2,"IpRanges":[{"CidrIp":"0.0.0.0/0"}]}]}]}"#,
            &["security group sg-1", "IpPermissions[0].IpProtocol"],
        ),
        (
            "aws port out of range",
            "json",
            r#"{"SecurityGroups":[{"GroupId":"sg-1","IpPermissions":[{"IpProtocol":"tcp","FromPort":1,"ToPort":70000,"IpRanges":[{"CidrIp":"0.0.0.0/0"}]}]}]}"#,
            &["sg-1", "IpPermissions[0].ToPort"],
        ),
        (
            "aws from > to",
            "json",
            r#"{"SecurityGroups":[{"GroupId":"sg-1","IpPermissionsEgress":[{"IpProtocol":"udp","FromPort":9,"ToPort":1,"IpRanges":[{"CidrIp":"0.0.0.0/0"}]}]}]}"#,
            &["sg-1", "egress[0].ports"],
        ),
        (
            "aws bad cidr",
            "json",
            r#"{"SecurityGroups":[{"GroupId":"sg-1","IpPermissions":[{"IpProtocol":"-1","IpRanges":[{"CidrIp":"10.0.0/8"}]}]}]}"#,
            &["sg-1", "IpPermissions[0].IpRanges[0].CidrIp"],
        ),
        (
            "aws v6 cidr in IpRanges",
            "json",
            r#"{"SecurityGroups":[{"GroupId":"sg-1","IpPermissions":[{"IpProtocol":"-1","IpRanges":[{"CidrIp":"::/0"}]}]}]}"#,
            &["sg-1", "IpRanges[0].CidrIp", "IPv4"],
        ),
        (
            "aws unknown group pair",
            "json",
            r#"{"SecurityGroups":[{"GroupId":"sg-1","IpPermissions":[{"IpProtocol":"-1","UserIdGroupPairs":[{"GroupId":"sg-9"}]}]}]}"#,
            &["sg-1", "sg-9"],
        ),
        (
            "aws missing GroupId",
            "json",
            r#"{"SecurityGroups":[{"GroupName":"x"}]}"#,
            &["GroupId"],
        ),
        (
            "aws duplicate group",
            "json",
            r#"{"SecurityGroups":[{"GroupId":"sg-1"},{"GroupId":"sg-1"}]}"#,
            &["security group sg-1", "duplicate"],
        ),
        (
            "aws interface unknown group",
            "json",
            r#"{"NetworkInterfaces":[{"NetworkInterfaceId":"eni-1","Groups":[{"GroupId":"sg-404"}]}]}"#,
            &["network interface eni-1", "groups[0]", "sg-404"],
        ),
        (
            "aws interface bad address",
            "json",
            r#"{"NetworkInterfaces":[{"NetworkInterfaceId":"eni-1","PrivateIpAddresses":[{"PrivateIpAddress":"nope"}]}]}"#,
            &[
                "network interface eni-1",
                "PrivateIpAddresses[0].PrivateIpAddress",
            ],
        ),
        (
            "aws prefix list bad entry",
            "json",
            r#"{"SecurityGroups":[],"ManagedPrefixLists":[{"PrefixListId":"pl-1","AddressFamily":"IPv4","Entries":[{"Cidr":"x"}]}]}"#,
            &["prefix list pl-1", "Entries[0].Cidr"],
        ),
    ];
    let many: Vec<String> = (0..17)
        .map(|i| format!("[[security_group]]\nid = \"sg-{i}\"\n"))
        .collect();
    let groups: Vec<String> = (0..17).map(|i| format!("\"sg-{i}\"")).collect();
    let too_many = format!(
        "{}[[interface]]\nid = \"eni-1\"\ngroups = [{}]\n",
        many.join(""),
        groups.join(", ")
    );
    native
        .into_iter()
        .chain(aws)
        .map(|(d, ext, text, want)| {
            let text = if d == "too many groups" {
                too_many.clone()
            } else {
                text.to_string()
            };
            (d.to_string(), ext, text, want.to_vec())
        })
        .collect()
}

#[test]
fn bad_inputs_are_rejected_naming_file_object_and_field() {
    let dir = std::env::temp_dir().join(format!("sg-sources-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = corpus();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    for (i, (description, ext, text, want)) in cases.iter().enumerate() {
        let path = dir.join(format!("case-{i}.{ext}"));
        std::fs::write(
            &path,
            format!(
                "{}{text}",
                if *ext == "toml" && text.is_empty() {
                    GROUP
                } else {
                    ""
                }
            ),
        )
        .unwrap();
        let err = load_file(&path).expect_err(description);
        let message = err.to_string();
        assert!(
            message.contains(&path.display().to_string()),
            "{description}: names the file: {message}"
        );
        for w in want {
            assert!(
                message.contains(w),
                "{description}: {w:?} missing from: {message}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("bad-input corpus: {} cases", cases.len());
}

#[test]
fn every_error_is_reported_at_once_with_lines() {
    let text = "[[security_group]]\nid = \"sg-a\"\ningress = [{ protocol = \"tcp\", ports = \"90-80\", from = [\"sg-x\"] }]\n\n[[interface]]\nid = \"eni-1\"\ngroups = [\"sg-y\"]\n";
    let problems = parse_str(text).unwrap_err();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    let lines: Vec<Option<usize>> = problems.iter().map(|p| p.line).collect();
    assert!(
        lines.contains(&Some(2)) && lines.contains(&Some(6)),
        "{problems:#?}"
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
