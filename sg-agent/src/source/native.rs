//! The native format: TOML, documented in docs/state-format.md.

#![forbid(unsafe_code)]

use super::*;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    settings: Option<RawSettings>,
    #[serde(default, rename = "security_group")]
    groups: Vec<RawGroup>,
    #[serde(default, rename = "prefix_list")]
    prefix_lists: Vec<RawPrefixList>,
    #[serde(default, rename = "interface")]
    interfaces: Vec<RawInterface>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default)]
    timeouts: BTreeMap<String, u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    id: Spanned<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    ingress: Vec<RawRule>,
    /// Absent: the default egress rule of a new group (all traffic to anywhere).
    #[serde(default)]
    egress: Option<Vec<RawRule>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrInt {
    Str(String),
    Int(i64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    protocol: StrOrInt,
    #[serde(default)]
    ports: Option<StrOrInt>,
    #[serde(default)]
    icmp_type: Option<i64>,
    #[serde(default)]
    icmp_code: Option<i64>,
    #[serde(default)]
    from: Vec<String>,
    #[serde(default)]
    to: Vec<String>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrefixList {
    id: Spanned<String>,
    #[serde(default)]
    name: Option<String>,
    family: String,
    #[serde(default)]
    entries: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    id: Spanned<String>,
    #[serde(default)]
    mac: Option<String>,
    #[serde(default)]
    ipv4: Vec<String>,
    #[serde(default)]
    ipv6: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    timeouts: BTreeMap<String, u32>,
}

pub fn parse(text: &str) -> Result<(State, super::ObjectLines), Vec<Problem>> {
    let file: File = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| super::Lines::new(text).line(s.start));
        let mut p = Problem::new("file", "syntax", e.message().trim().to_string());
        p.line = line;
        vec![p]
    })?;
    if file.groups.is_empty() && file.interfaces.is_empty() {
        return Err(vec![Problem::new(
            "file",
            "-",
            "empty state: no [[security_group]] and no [[interface]] (an empty state is far more often a truncated write or a typo than an intent; to enforce nothing, list the interfaces with no groups)",
        )]);
    }
    let mut problems = Vec::new();
    let mut lines = super::ObjectLines::default();
    let index = super::Lines::new(text);
    let mut state = State {
        settings: Settings {
            timeouts: file.settings.map(|s| s.timeouts).unwrap_or_default(),
        },
        ..State::default()
    };
    for g in file.groups {
        let id = g.id.get_ref().clone();
        let object = group_object(&id);
        let line = index.line(g.id.span().start);
        lines.named.insert(object.clone(), line);
        let _ = g.description;
        let mut rules = |raw: Vec<RawRule>, dir: Direction| -> Vec<Rule> {
            raw.into_iter()
                .enumerate()
                .filter_map(|(i, r)| match rule(r, dir, &format!("{dir}[{i}]")) {
                    Ok(r) => Some(r),
                    Err((field, msg)) => {
                        let mut p = Problem::new(&object, field, msg);
                        p.line = Some(line);
                        problems.push(p);
                        None
                    }
                })
                .collect()
        };
        let ingress = rules(g.ingress, Direction::Ingress);
        let egress = match g.egress {
            Some(e) => rules(e, Direction::Egress),
            None => vec![Rule::default_egress()],
        };
        state.security_groups.push(SecurityGroup {
            name: g.name.unwrap_or_else(|| id.clone()),
            id,
            ingress,
            egress,
        });
    }
    for p in file.prefix_lists {
        let id = p.id.get_ref().clone();
        let object = prefix_list_object(&id);
        let line = index.line(p.id.span().start);
        lines.named.insert(object.clone(), line);
        let mut err = |field: String, msg: String| {
            let mut pr = Problem::new(&object, field, msg);
            pr.line = Some(line);
            problems.push(pr);
        };
        let family = match p.family.to_ascii_lowercase().as_str() {
            "ipv4" => Family::V4,
            "ipv6" => Family::V6,
            other => {
                err("family".into(), format!("{other:?} is not ipv4 or ipv6"));
                Family::V4
            }
        };
        let mut entries = Vec::new();
        for (i, e) in p.entries.iter().enumerate() {
            match e.parse::<Cidr>() {
                Ok(c) => entries.push(c),
                Err(m) => err(format!("entries[{i}]"), m.to_string()),
            }
        }
        state.prefix_lists.push(PrefixList {
            name: p.name.unwrap_or_else(|| id.clone()),
            id,
            family,
            entries,
        });
    }
    for n in file.interfaces {
        let line = index.line(n.id.span().start);
        lines.interfaces.push(line);
        state
            .network_interfaces
            .push(interface(n, Some(line), &mut problems));
    }
    if problems.is_empty() {
        Ok((state, lines))
    } else {
        // Report structural problems together with what validation finds.
        problems.extend(state.validate().into_iter().map(|mut p| {
            p.line = lines.get(&state, &p.object);
            p
        }));
        problems.sort();
        problems.dedup();
        Err(problems)
    }
}

/// Network interfaces alone: text made only of `[[interface]]` tables (a part of a
/// state file that held only interfaces). None when it holds anything else or any
/// interface has a problem.
pub fn parse_interfaces(text: &str) -> Option<Vec<NetworkInterface>> {
    let file: File = toml::from_str(text).ok()?;
    if file.settings.is_some() || !file.groups.is_empty() || !file.prefix_lists.is_empty() {
        return None;
    }
    let mut problems = Vec::new();
    let out: Vec<NetworkInterface> = file
        .interfaces
        .into_iter()
        .map(|n| interface(n, None, &mut problems))
        .collect();
    problems.is_empty().then_some(out)
}

fn interface(
    n: RawInterface,
    line: Option<usize>,
    problems: &mut Vec<Problem>,
) -> NetworkInterface {
    let id = n.id.into_inner();
    let mut err = |field: String, msg: String| {
        let mut pr = Problem::new(interface_object(&id), field, msg);
        pr.line = line;
        problems.push(pr);
    };
    let mac = n
        .mac
        .as_deref()
        .and_then(|m| normalize_mac(m).map_err(|e| err("mac".into(), e)).ok());
    let mut ipv4 = Vec::new();
    for (i, a) in n.ipv4.iter().enumerate() {
        match a.parse::<Ipv4Addr>() {
            Ok(a) => ipv4.push(a),
            Err(_) => err(
                format!("ipv4[{i}]"),
                format!("{a:?} is not an IPv4 address"),
            ),
        }
    }
    let mut ipv6 = Vec::new();
    for (i, a) in n.ipv6.iter().enumerate() {
        match a.parse::<Ipv6Addr>() {
            Ok(a) => ipv6.push(a),
            Err(_) => err(
                format!("ipv6[{i}]"),
                format!("{a:?} is not an IPv6 address"),
            ),
        }
    }
    NetworkInterface {
        id,
        mac,
        ipv4,
        ipv6,
        groups: n.groups,
        timeouts: n.timeouts,
    }
}

fn rule(r: RawRule, dir: Direction, at: &str) -> Result<Rule, (String, String)> {
    let protocol = match &r.protocol {
        StrOrInt::Str(s) => Protocol::parse(s),
        StrOrInt::Int(-1) => Some(Protocol::All),
        StrOrInt::Int(n) => u8::try_from(*n).ok().map(Protocol::Number),
    }
    .ok_or_else(|| {
        let shown = match &r.protocol {
            StrOrInt::Str(s) => format!("{s:?}"),
            StrOrInt::Int(n) => n.to_string(),
        };
        (
            format!("{at}.protocol"),
            format!(
                "unknown protocol {shown}; use tcp, udp, icmp, icmpv6, all (-1) or a number 0-255"
            ),
        )
    })?;
    let ports = match (&r.ports, r.icmp_type, r.icmp_code) {
        (Some(p), None, None) => {
            if !protocol.has_ports() {
                return Err((
                    format!("{at}.ports"),
                    format!("ports apply only to tcp and udp, not {protocol}"),
                ));
            }
            parse_ports(p).map_err(|m| (format!("{at}.ports"), m))?
        }
        (None, None, None) => PortMatch::Any,
        (None, t, c) => {
            if !protocol.is_icmp() {
                return Err((
                    format!("{at}.icmp_type"),
                    format!("ICMP type and code apply only to icmp and icmpv6, not {protocol}"),
                ));
            }
            let field = |v: Option<i64>, name: &str| -> Result<Option<u8>, (String, String)> {
                match v {
                    None | Some(-1) => Ok(None),
                    Some(n) => u8::try_from(n)
                        .map(Some)
                        .map_err(|_| (format!("{at}.{name}"), format!("{n} is not -1 or 0-255"))),
                }
            };
            PortMatch::Icmp {
                icmp_type: field(t, "icmp_type")?,
                code: field(c, "icmp_code")?,
            }
        }
        (Some(_), _, _) => {
            return Err((
                format!("{at}.ports"),
                "give either ports or icmp_type/icmp_code, not both".into(),
            ))
        }
    };
    let (peers_field, peers, other, other_name) = match dir {
        Direction::Ingress => ("from", &r.from, &r.to, "to"),
        Direction::Egress => ("to", &r.to, &r.from, "from"),
    };
    if !other.is_empty() {
        return Err((
            format!("{at}.{other_name}"),
            format!("{dir} rules name their peers in {peers_field:?}, not {other_name:?}"),
        ));
    }
    if peers.is_empty() {
        return Err((
            format!("{at}.{peers_field}"),
            "a rule needs at least one peer".into(),
        ));
    }
    let mut out = Vec::new();
    for (j, p) in peers.iter().enumerate() {
        out.push(parse_peer(p).map_err(|m| (format!("{at}.{peers_field}[{j}]"), m))?);
    }
    Ok(Rule {
        protocol,
        ports,
        peers: out,
        description: r.description,
    })
}

fn parse_ports(p: &StrOrInt) -> Result<PortMatch, String> {
    let port = |s: &str| -> Result<u16, String> {
        s.trim()
            .parse::<u16>()
            .map_err(|_| format!("{s:?} is not a port 0-65535"))
    };
    match p {
        StrOrInt::Int(n) => u16::try_from(*n)
            .map(|n| PortMatch::Ports { from: n, to: n })
            .map_err(|_| format!("{n} is not a port 0-65535")),
        StrOrInt::Str(s) if s.trim() == "all" || s.trim() == "*" => Ok(PortMatch::Ports {
            from: 0,
            to: u16::MAX,
        }),
        StrOrInt::Str(s) => match s.split_once('-') {
            Some((a, b)) => Ok(PortMatch::Ports {
                from: port(a)?,
                to: port(b)?,
            }),
            None => {
                let n = port(s)?;
                Ok(PortMatch::Ports { from: n, to: n })
            }
        },
    }
}
