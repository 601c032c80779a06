//! AWS JSON: `SecurityGroups`, `NetworkInterfaces`, `ManagedPrefixLists` with the shapes
//! of the EC2 API outputs. Unknown keys are ignored (unknown top-level keys are warned
//! about); a missing list is empty, but a document with neither `SecurityGroups` nor
//! `NetworkInterfaces` is an empty state, which is invalid (SPEC §3).

#![forbid(unsafe_code)]

use super::*;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct File {
    security_groups: Option<Vec<Group>>,
    network_interfaces: Option<Vec<Interface>>,
    #[serde(default)]
    managed_prefix_lists: Vec<ManagedPrefixList>,
    /// Every other top-level key: warned about, never an error.
    #[serde(flatten)]
    other: BTreeMap<String, serde::de::IgnoredAny>,
}

/// The top-level keys this format knows.
const KNOWN_KEYS: [&str; 3] = ["SecurityGroups", "NetworkInterfaces", "ManagedPrefixLists"];

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Group {
    group_id: String,
    #[serde(default)]
    group_name: Option<String>,
    #[serde(default)]
    ip_permissions: Vec<Permission>,
    #[serde(default)]
    ip_permissions_egress: Vec<Permission>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Permission {
    ip_protocol: serde_json::Value,
    #[serde(default)]
    from_port: Option<serde_json::Value>,
    #[serde(default)]
    to_port: Option<serde_json::Value>,
    #[serde(default)]
    ip_ranges: Vec<IpRange>,
    #[serde(default)]
    ipv6_ranges: Vec<Ipv6Range>,
    #[serde(default)]
    user_id_group_pairs: Vec<GroupPair>,
    #[serde(default)]
    prefix_list_ids: Vec<PrefixListId>,
    /// Not in DescribeSecurityGroups' output: a rule id carried over from
    /// DescribeSecurityGroupRules (`sgr-…`), used as the rule's stable id.
    #[serde(default)]
    security_group_rule_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IpRange {
    cidr_ip: String,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Ipv6Range {
    cidr_ipv6: String,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GroupPair {
    group_id: String,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PrefixListId {
    prefix_list_id: String,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Interface {
    network_interface_id: String,
    #[serde(default)]
    mac_address: Option<String>,
    #[serde(default)]
    private_ip_address: Option<String>,
    #[serde(default)]
    private_ip_addresses: Vec<PrivateIp>,
    #[serde(default)]
    ipv6_addresses: Vec<Ipv6Address>,
    #[serde(default)]
    groups: Vec<GroupIdentifier>,
    /// The tag `sg:audit` = `true` puts the interface in audit mode.
    #[serde(default)]
    tag_set: Vec<Tag>,
    #[serde(default)]
    owner_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Tag {
    key: String,
    #[serde(default)]
    value: String,
}

/// The tag key that puts an interface in audit mode (SPEC §7).
pub const AUDIT_TAG: &str = "sg:audit";

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PrivateIp {
    private_ip_address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Ipv6Address {
    ipv6_address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GroupIdentifier {
    group_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ManagedPrefixList {
    prefix_list_id: String,
    #[serde(default)]
    prefix_list_name: Option<String>,
    address_family: String,
    #[serde(default)]
    entries: Vec<PrefixListEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PrefixListEntry {
    cidr: String,
}

pub fn parse(text: &str) -> Result<(State, ObjectLines, Origins), Vec<Problem>> {
    if super::is_json_array(text.trim_start()) {
        return Err(vec![Problem::new(
            "file",
            "-",
            "AWS JSON is one object with SecurityGroups, NetworkInterfaces and ManagedPrefixLists, not an array",
        )]);
    }
    let file: File = serde_json::from_str(text).map_err(|e| {
        let mut p = Problem::new("file", "syntax", friendly(&e.to_string()));
        p.line = Some(e.line());
        vec![p]
    })?;
    if file.security_groups.is_none() && file.network_interfaces.is_none() {
        return Err(vec![Problem::new(
            "file",
            "-",
            format!(
                "empty state: neither SecurityGroups nor NetworkInterfaces is present{} (an empty state is far more often a truncated write or a typo than an intent; to enforce nothing, list the interfaces with no Groups)",
                if file.other.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; top-level keys found: {}",
                        file.other.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                }
            ),
        )]);
    }
    let mut problems = Vec::new();
    let mut state = State::default();
    let mut origins = Origins {
        aws: true,
        ..Origins::default()
    };
    let lines = object_lines(text, &file);
    for key in file.other.keys() {
        state.warnings.push(Problem::new(
            "file",
            key.as_str(),
            format!(
                "unknown top-level key, ignored (known: {})",
                KNOWN_KEYS.join(", ")
            ),
        ));
    }
    for g in file.security_groups.unwrap_or_default() {
        let object = group_object(&g.group_id);
        let line = lines.named.get(&object).copied();
        let gi = state.security_groups.len();
        let mut convert = |perms: Vec<Permission>, field: &str, dir: Direction| -> Vec<Rule> {
            let mut out = Vec::new();
            for (i, p) in perms.into_iter().enumerate() {
                let rank = rule_rank(dir, i);
                let (rule, origin, errors) = permission(p, &format!("{field}[{i}]"), rank);
                for (f, m) in errors {
                    let mut p = Problem::new(&object, f, m);
                    p.line = line;
                    p.rank = rank;
                    problems.push(p);
                }
                // A rule with problems is kept with its well-formed peers only, so that
                // their references are checked too; the state is refused anyway.
                if let Some(rule) = rule {
                    origins.rules.insert((gi, dir, out.len()), origin);
                    out.push(rule);
                }
            }
            out
        };
        let ingress = convert(g.ip_permissions, "IpPermissions", Direction::Ingress);
        let egress = convert(
            g.ip_permissions_egress,
            "IpPermissionsEgress",
            Direction::Egress,
        );
        state.security_groups.push(SecurityGroup {
            name: g.group_name.unwrap_or_else(|| g.group_id.clone()),
            id: g.group_id,
            ingress,
            egress,
        });
    }
    for pl in file.managed_prefix_lists {
        let object = prefix_list_object(&pl.prefix_list_id);
        let family = match pl.address_family.to_ascii_lowercase().as_str() {
            "ipv4" => Family::V4,
            "ipv6" => Family::V6,
            other => {
                problems.push(Problem::new(
                    &object,
                    "AddressFamily",
                    format!("{other:?} is not IPv4 or IPv6"),
                ));
                Family::V4
            }
        };
        let mut entries = Vec::new();
        for (i, e) in pl.entries.iter().enumerate() {
            match e.cidr.parse::<Cidr>() {
                Ok(c) => entries.push(c),
                Err(m) => problems.push(Problem::new(
                    &object,
                    format!("Entries[{i}].Cidr"),
                    m.to_string(),
                )),
            }
        }
        state.prefix_lists.push(PrefixList {
            name: pl
                .prefix_list_name
                .unwrap_or_else(|| pl.prefix_list_id.clone()),
            id: pl.prefix_list_id,
            family,
            entries,
        });
    }
    for n in file.network_interfaces.unwrap_or_default() {
        state.network_interfaces.push(interface(n, &mut problems));
    }
    if problems.is_empty() {
        Ok((state, lines, origins))
    } else {
        problems.extend(state.validate_named(&origins).into_iter().map(|mut p| {
            p.line = p.line.or_else(|| lines.get(&state, &p.object));
            p
        }));
        for p in &mut problems {
            p.line = p.line.or_else(|| lines.get(&state, &p.object));
        }
        Err(problems)
    }
}

/// Lines where the file's objects start (the items of its three lists), found by a scan
/// of the JSON text; empty when the scan cannot tell.
fn object_lines(text: &str, file: &File) -> ObjectLines {
    let index = Lines::new(text);
    let mut out = ObjectLines::default();
    let b = text.as_bytes();
    let starts = |key: &[u8]| -> Vec<usize> {
        super::document::json_top_level_items(b, key)
            .unwrap_or_default()
            .into_iter()
            .map(|r| index.line(r.start))
            .collect()
    };
    for (g, line) in file
        .security_groups
        .iter()
        .flatten()
        .zip(starts(b"SecurityGroups"))
    {
        out.named.entry(group_object(&g.group_id)).or_insert(line);
    }
    for (p, line) in file
        .managed_prefix_lists
        .iter()
        .zip(starts(b"ManagedPrefixLists"))
    {
        out.named
            .entry(prefix_list_object(&p.prefix_list_id))
            .or_insert(line);
    }
    out.interfaces = starts(b"NetworkInterfaces");
    out
}

/// A serde message in the user's terms: no Rust type names.
pub(super) fn friendly(message: &str) -> String {
    let mut m = message.to_string();
    for (rust, words) in [
        ("expected i64", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number"),
        ("expected u8", "expected a whole number"),
        ("expected usize", "expected a whole number"),
        ("expected a sequence", "expected a list"),
        ("expected a map", "expected an object"),
    ] {
        m = m.replace(rust, words);
    }
    while let Some(at) = m.find("expected struct ") {
        let end = m[at + 16..]
            .find(|c: char| !c.is_alphanumeric())
            .map_or(m.len(), |e| at + 16 + e);
        m.replace_range(at..end, "expected an object");
    }
    m
}

/// Network interfaces alone: the items of a `NetworkInterfaces` list, without the
/// brackets. None when they do not parse or any interface has a problem.
pub fn parse_interfaces(items: &str) -> Option<Vec<NetworkInterface>> {
    let mut text = String::with_capacity(items.len() + 2);
    text.push('[');
    text.push_str(items);
    text.push(']');
    let raw: Vec<Interface> = serde_json::from_str(&text).ok()?;
    let mut problems = Vec::new();
    let out: Vec<NetworkInterface> = raw
        .into_iter()
        .map(|n| interface(n, &mut problems))
        .collect();
    problems.is_empty().then_some(out)
}

fn interface(n: Interface, problems: &mut Vec<Problem>) -> NetworkInterface {
    // Names are built only for problems: a state has 100k interfaces.
    let object = || interface_object(&n.network_interface_id);
    let mac = n.mac_address.as_deref().and_then(|m| {
        normalize_mac(m)
            .map_err(|e| problems.push(Problem::new(object(), "MacAddress", e)))
            .ok()
    });
    let mut ipv4 = Vec::new();
    // Index 0 is the primary address field, i + 1 the i-th listed address.
    let primary = n.private_ip_address.iter().map(|a| (a.as_str(), None));
    let listed = n
        .private_ip_addresses
        .iter()
        .enumerate()
        .map(|(i, a)| (a.private_ip_address.as_str(), Some(i)));
    let mut listed_seen = Vec::new();
    for (a, at) in primary.chain(listed) {
        match a.parse::<Ipv4Addr>() {
            // The primary address is listed again in PrivateIpAddresses, as EC2 prints it;
            // an address listed twice there is a mistake.
            Ok(addr) if at.is_some() && listed_seen.contains(&addr) => {
                problems.push(Problem::new(
                    object(),
                    format!(
                        "PrivateIpAddresses[{}].PrivateIpAddress",
                        at.expect("listed")
                    ),
                    format!("{addr} is listed twice"),
                ));
            }
            Ok(addr) if !ipv4.contains(&addr) => {
                if at.is_some() {
                    listed_seen.push(addr);
                }
                ipv4.push(addr)
            }
            Ok(addr) => {
                if at.is_some() {
                    listed_seen.push(addr);
                }
            }
            Err(_) => problems.push(Problem::new(
                object(),
                match at {
                    None => "PrivateIpAddress".to_string(),
                    Some(i) => format!("PrivateIpAddresses[{i}].PrivateIpAddress"),
                },
                format!("{a:?} is not an IPv4 address"),
            )),
        }
    }
    let mut ipv6 = Vec::new();
    for (i, a) in n.ipv6_addresses.iter().enumerate() {
        match a.ipv6_address.parse::<Ipv6Addr>() {
            Ok(a) => ipv6.push(a),
            Err(_) => problems.push(Problem::new(
                object(),
                format!("Ipv6Addresses[{i}].Ipv6Address"),
                format!("{:?} is not an IPv6 address", a.ipv6_address),
            )),
        }
    }
    NetworkInterface {
        id: n.network_interface_id,
        mac,
        ipv4,
        ipv6,
        groups: n.groups.into_iter().map(|g| g.group_id).collect(),
        timeouts: BTreeMap::new(),
        audit: n
            .tag_set
            .iter()
            .any(|t| t.key == AUDIT_TAG && t.value.eq_ignore_ascii_case("true")),
        owner_id: n.owner_id,
    }
}

/// One permission of the file (at field `at`), its origin, and every problem it has on
/// its own.
fn permission(p: Permission, at: &str, rank: u32) -> (Option<Rule>, RuleOrigin, FieldErrors) {
    let mut errors = Vec::new();
    let protocol = match &p.ip_protocol {
        serde_json::Value::String(s) => Protocol::parse(s),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(-1) => Some(Protocol::All),
            Some(n) => u8::try_from(n).ok().map(Protocol::Number),
            None => None,
        },
        _ => None,
    };
    if protocol.is_none() {
        errors.push((
            format!("{at}.IpProtocol"),
            format!(
                "unknown protocol {}; use tcp, udp, icmp, icmpv6, -1 or a number 0-255",
                p.ip_protocol
            ),
        ));
    }
    // FromPort/ToPort: a whole number, or absent.
    let mut number = |v: &Option<serde_json::Value>, name: &str| -> Option<i64> {
        match v {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) if n.as_i64().is_some() => n.as_i64(),
            Some(other) => {
                errors.push((
                    format!("{at}.{name}"),
                    format!("{other} is not a whole number"),
                ));
                Some(-1)
            }
        }
    };
    let (from, to) = (
        number(&p.from_port, "FromPort"),
        number(&p.to_port, "ToPort"),
    );
    // As the EC2 API: TCP, UDP and ICMP permissions name their ports or types.
    if let Some(proto) = protocol.filter(|p| p.has_ports() || *p == Protocol::Number(1)) {
        for (v, name) in [(from, "FromPort"), (to, "ToPort")] {
            if v.is_none() {
                errors.push((
                    format!("{at}.{name}"),
                    if proto.has_ports() {
                        format!("a {proto} permission needs FromPort and ToPort (0 and 65535 for every port)")
                    } else {
                        "an icmp permission needs FromPort (the type) and ToPort (the code); -1 means any".to_string()
                    },
                ));
            }
        }
    }
    let ports = match protocol {
        Some(proto) if proto.has_ports() => {
            let mut port = |v: Option<i64>, name: &str, default: u16| -> u16 {
                match v {
                    None | Some(-1) => default,
                    Some(n) => u16::try_from(n).unwrap_or_else(|_| {
                        errors.push((format!("{at}.{name}"), format!("{n} is not a port 0-65535")));
                        default
                    }),
                }
            };
            PortMatch::Ports {
                from: port(from, "FromPort", 0),
                to: port(to, "ToPort", u16::MAX),
            }
        }
        Some(proto) if proto.is_icmp() => {
            let mut field = |v: Option<i64>, name: &str| -> Option<u8> {
                match v {
                    None | Some(-1) => None,
                    Some(n) => u8::try_from(n).map(Some).unwrap_or_else(|_| {
                        errors.push((
                            format!("{at}.{name}"),
                            format!("{n} is not -1 or an ICMP value 0-255"),
                        ));
                        None
                    }),
                }
            };
            PortMatch::Icmp {
                icmp_type: field(from, "FromPort"),
                code: field(to, "ToPort"),
            }
        }
        _ => PortMatch::Any,
    };
    let mut origin = RuleOrigin {
        rank,
        protocol: format!("{at}.IpProtocol"),
        ports: format!("{at}.FromPort"),
        icmp_type: format!("{at}.FromPort"),
        icmp_code: format!("{at}.ToPort"),
        peers: at.to_string(),
        peer: Vec::new(),
    };
    let mut peers = Vec::new();
    let mut description = None;
    let cidr =
        |text: &str, field: String, family: Family, errors: &mut Vec<(String, String)>| match text
            .parse::<Cidr>(
        ) {
            Ok(c) if c.family() == family => Some((c, field)),
            Ok(c) => {
                errors.push((field, format!("{c} is not an {family} CIDR")));
                None
            }
            Err(m) => {
                errors.push((field, m.to_string()));
                None
            }
        };
    for (i, r) in p.ip_ranges.iter().enumerate() {
        let field = format!("{at}.IpRanges[{i}].CidrIp");
        if let Some((c, field)) = cidr(&r.cidr_ip, field, Family::V4, &mut errors) {
            peers.push(Peer::Cidr(c));
            origin.peer.push(field);
        }
        description = description.or(r.description.clone());
    }
    for (i, r) in p.ipv6_ranges.iter().enumerate() {
        let field = format!("{at}.Ipv6Ranges[{i}].CidrIpv6");
        if let Some((c, field)) = cidr(&r.cidr_ipv6, field, Family::V6, &mut errors) {
            peers.push(Peer::Cidr(c));
            origin.peer.push(field);
        }
        description = description.or(r.description.clone());
    }
    for (i, pair) in p.user_id_group_pairs.iter().enumerate() {
        peers.push(Peer::Group(pair.group_id.clone()));
        origin
            .peer
            .push(format!("{at}.UserIdGroupPairs[{i}].GroupId"));
        description = description.or(pair.description.clone());
    }
    for (i, pl) in p.prefix_list_ids.iter().enumerate() {
        peers.push(Peer::PrefixList(pl.prefix_list_id.clone()));
        origin
            .peer
            .push(format!("{at}.PrefixListIds[{i}].PrefixListId"));
        description = description.or(pl.description.clone());
    }
    // With problems, what is kept is only for checking the peers' references.
    let rule = (errors.is_empty() || !peers.is_empty()).then(|| Rule {
        protocol: if errors.is_empty() {
            protocol.expect("no errors")
        } else {
            Protocol::All
        },
        ports: if errors.is_empty() {
            ports
        } else {
            PortMatch::Any
        },
        peers,
        description,
        id: p.security_group_rule_id,
    });
    (rule, origin, errors)
}

/// The state in AWS JSON shapes (the inverse of `parse`): one object with
/// `SecurityGroups`, `NetworkInterfaces` and `ManagedPrefixLists`. Keys are sorted and the
/// output has no insignificant white space, so equal states give equal bytes (publishing
/// compares objects by their bytes).
pub fn to_aws_json(state: &State) -> String {
    serde_json::json!({
        "SecurityGroups": state.security_groups.iter().map(group_json).collect::<Vec<_>>(),
        "NetworkInterfaces": state.network_interfaces.iter().map(interface_json).collect::<Vec<_>>(),
        "ManagedPrefixLists": state.prefix_lists.iter().map(prefix_list_json).collect::<Vec<_>>(),
    })
    .to_string()
}

/// One security group as DescribeSecurityGroups prints it.
pub fn group_json(g: &SecurityGroup) -> serde_json::Value {
    serde_json::json!({
        "GroupId": g.id,
        "GroupName": g.name,
        "IpPermissions": g.ingress.iter().map(permission_json).collect::<Vec<_>>(),
        "IpPermissionsEgress": g.egress.iter().map(permission_json).collect::<Vec<_>>(),
    })
}

/// One network interface as DescribeNetworkInterfaces prints it.
pub fn interface_json(n: &NetworkInterface) -> serde_json::Value {
    let mut v = serde_json::json!({
        "NetworkInterfaceId": n.id,
        "PrivateIpAddresses": n.ipv4.iter().map(|a| serde_json::json!({ "PrivateIpAddress": a.to_string() })).collect::<Vec<_>>(),
        "Ipv6Addresses": n.ipv6.iter().map(|a| serde_json::json!({ "Ipv6Address": a.to_string() })).collect::<Vec<_>>(),
        "Groups": n.groups.iter().map(|g| serde_json::json!({ "GroupId": g })).collect::<Vec<_>>(),
    });
    if let Some(mac) = &n.mac {
        v["MacAddress"] = mac.as_str().into();
    }
    if let Some(owner) = &n.owner_id {
        v["OwnerId"] = owner.as_str().into();
    }
    if n.audit {
        v["TagSet"] = serde_json::json!([{ "Key": AUDIT_TAG, "Value": "true" }]);
    }
    v
}

/// One managed prefix list with its entries (DescribeManagedPrefixLists plus
/// GetManagedPrefixListEntries).
pub fn prefix_list_json(p: &PrefixList) -> serde_json::Value {
    serde_json::json!({
        "PrefixListId": p.id,
        "PrefixListName": p.name,
        "AddressFamily": match p.family { Family::V4 => "IPv4", Family::V6 => "IPv6" },
        "Entries": p.entries.iter().map(|c| serde_json::json!({ "Cidr": c.to_string() })).collect::<Vec<_>>(),
    })
}

fn permission_json(r: &Rule) -> serde_json::Value {
    let protocol = match r.protocol {
        Protocol::All => "-1".to_string(),
        Protocol::Number(6) => "tcp".into(),
        Protocol::Number(17) => "udp".into(),
        Protocol::Number(1) => "icmp".into(),
        Protocol::Number(58) => "icmpv6".into(),
        Protocol::Number(n) => n.to_string(),
    };
    let (from, to) = match r.ports {
        // As the EC2 API writes them: every port of TCP and UDP, every ICMP type.
        PortMatch::Any if r.protocol.has_ports() => (Some(0), Some(65535)),
        PortMatch::Any if r.protocol.is_icmp() => (Some(-1), Some(-1)),
        PortMatch::Any => (None, None),
        PortMatch::Ports { from, to } => (Some(from as i64), Some(to as i64)),
        PortMatch::Icmp { icmp_type, code } => (
            Some(icmp_type.map_or(-1, i64::from)),
            Some(code.map_or(-1, i64::from)),
        ),
    };
    let described = |mut v: serde_json::Value| {
        if let Some(d) = &r.description {
            v["Description"] = d.as_str().into();
        }
        v
    };
    let (mut v4, mut v6, mut groups, mut lists) = (vec![], vec![], vec![], vec![]);
    for peer in &r.peers {
        match peer {
            Peer::Cidr(c) if c.family() == Family::V4 => {
                v4.push(described(serde_json::json!({ "CidrIp": c.to_string() })))
            }
            Peer::Cidr(c) => v6.push(described(serde_json::json!({ "CidrIpv6": c.to_string() }))),
            Peer::Group(g) => groups.push(described(serde_json::json!({ "GroupId": g }))),
            Peer::PrefixList(l) => lists.push(described(serde_json::json!({ "PrefixListId": l }))),
        }
    }
    let mut v = serde_json::json!({
        "IpProtocol": protocol,
        "IpRanges": v4,
        "Ipv6Ranges": v6,
        "UserIdGroupPairs": groups,
        "PrefixListIds": lists,
    });
    if let (Some(from), Some(to)) = (from, to) {
        v["FromPort"] = from.into();
        v["ToPort"] = to.into();
    }
    if let Some(id) = &r.id {
        v["SecurityGroupRuleId"] = id.as_str().into();
    }
    v
}
