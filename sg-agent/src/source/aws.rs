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
    from_port: Option<i64>,
    #[serde(default)]
    to_port: Option<i64>,
    #[serde(default)]
    ip_ranges: Vec<IpRange>,
    #[serde(default)]
    ipv6_ranges: Vec<Ipv6Range>,
    #[serde(default)]
    user_id_group_pairs: Vec<GroupPair>,
    #[serde(default)]
    prefix_list_ids: Vec<PrefixListId>,
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
}

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

pub fn parse(text: &str) -> Result<State, Vec<Problem>> {
    if super::is_json_array(text.trim_start()) {
        return Err(vec![Problem::new(
            "file",
            "-",
            "AWS JSON is one object with SecurityGroups, NetworkInterfaces and ManagedPrefixLists, not an array",
        )]);
    }
    let file: File = serde_json::from_str(text).map_err(|e| {
        let mut p = Problem::new("file", "syntax", e.to_string());
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
        let mut convert = |perms: Vec<Permission>, field: &str| -> Vec<Rule> {
            perms
                .into_iter()
                .enumerate()
                .filter_map(|(i, p)| match permission(p, &format!("{field}[{i}]")) {
                    Ok(r) => Some(r),
                    Err((f, m)) => {
                        problems.push(Problem::new(&object, f, m));
                        None
                    }
                })
                .collect()
        };
        let ingress = convert(g.ip_permissions, "IpPermissions");
        let egress = convert(g.ip_permissions_egress, "IpPermissionsEgress");
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
        Ok(state)
    } else {
        problems.extend(state.validate());
        problems.sort();
        problems.dedup();
        Err(problems)
    }
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
    for (a, at) in primary.chain(listed) {
        match a.parse::<Ipv4Addr>() {
            Ok(a) if !ipv4.contains(&a) => ipv4.push(a),
            Ok(_) => {}
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
    }
}

fn permission(p: Permission, at: &str) -> Result<Rule, (String, String)> {
    let protocol = match &p.ip_protocol {
        serde_json::Value::String(s) => Protocol::parse(s),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(-1) => Some(Protocol::All),
            Some(n) => u8::try_from(n).ok().map(Protocol::Number),
            None => None,
        },
        _ => None,
    }
    .ok_or_else(|| {
        (
            format!("{at}.IpProtocol"),
            format!(
                "unknown protocol {}; use tcp, udp, icmp, icmpv6, -1 or a number 0-255",
                p.ip_protocol
            ),
        )
    })?;
    let ports = if protocol.has_ports() {
        let port = |v: Option<i64>, name: &str, default: u16| -> Result<u16, (String, String)> {
            match v {
                None | Some(-1) => Ok(default),
                Some(n) => u16::try_from(n)
                    .map_err(|_| (format!("{at}.{name}"), format!("{n} is not a port 0-65535"))),
            }
        };
        PortMatch::Ports {
            from: port(p.from_port, "FromPort", 0)?,
            to: port(p.to_port, "ToPort", u16::MAX)?,
        }
    } else if protocol.is_icmp() {
        let field = |v: Option<i64>, name: &str| -> Result<Option<u8>, (String, String)> {
            match v {
                None | Some(-1) => Ok(None),
                Some(n) => u8::try_from(n).map(Some).map_err(|_| {
                    (
                        format!("{at}.{name}"),
                        format!("{n} is not -1 or an ICMP value 0-255"),
                    )
                }),
            }
        };
        PortMatch::Icmp {
            icmp_type: field(p.from_port, "FromPort")?,
            code: field(p.to_port, "ToPort")?,
        }
    } else {
        PortMatch::Any
    };
    let mut peers = Vec::new();
    let mut description = None;
    for (i, r) in p.ip_ranges.iter().enumerate() {
        let c = r
            .cidr_ip
            .parse::<Cidr>()
            .map_err(|m| (format!("{at}.IpRanges[{i}].CidrIp"), m.to_string()))?;
        if c.family() != Family::V4 {
            return Err((
                format!("{at}.IpRanges[{i}].CidrIp"),
                format!("{c} is not an IPv4 CIDR"),
            ));
        }
        peers.push(Peer::Cidr(c));
        description = description.or(r.description.clone());
    }
    for (i, r) in p.ipv6_ranges.iter().enumerate() {
        let c = r
            .cidr_ipv6
            .parse::<Cidr>()
            .map_err(|m| (format!("{at}.Ipv6Ranges[{i}].CidrIpv6"), m.to_string()))?;
        if c.family() != Family::V6 {
            return Err((
                format!("{at}.Ipv6Ranges[{i}].CidrIpv6"),
                format!("{c} is not an IPv6 CIDR"),
            ));
        }
        peers.push(Peer::Cidr(c));
        description = description.or(r.description.clone());
    }
    for pair in &p.user_id_group_pairs {
        peers.push(Peer::Group(pair.group_id.clone()));
        description = description.or(pair.description.clone());
    }
    for pl in &p.prefix_list_ids {
        peers.push(Peer::PrefixList(pl.prefix_list_id.clone()));
        description = description.or(pl.description.clone());
    }
    Ok(Rule {
        protocol,
        ports,
        peers,
        description,
    })
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
    v
}
