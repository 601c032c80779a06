//! State sources: the native TOML format and AWS JSON (the shapes of the EC2 Describe*
//! outputs), chosen by content. Parsing turns text into `model::State`; every problem,
//! from syntax to references, is reported at once with the file, object and field.

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use serde::Deserialize;
use sha2::{Digest, Sha256};

mod document;

pub use document::{Document, InterfaceChange};

use crate::{
    model::{
        group_object, interface_object, prefix_list_object, Direction, NetworkInterface, Peer,
        PortMatch, PrefixList, Problem, Protocol, Rule, SecurityGroup, Settings, State,
    },
    net::{Cidr, Family},
};

/// Every problem of a state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match p.line {
                Some(line) => write!(
                    f,
                    "{}:{line}: {}: {}: {}",
                    self.file.display(),
                    p.object,
                    p.field,
                    p.message
                )?,
                None => write!(
                    f,
                    "{}: {}: {}: {}",
                    self.file.display(),
                    p.object,
                    p.field,
                    p.message
                )?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for StateError {}

/// A state read from a file, with the SHA-256 of the exact content.
#[derive(Debug, Clone)]
pub struct LoadedState {
    pub state: State,
    pub sha256: String,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads, parses and validates a state file.
pub fn load_file(path: &Path) -> Result<LoadedState, StateError> {
    let bytes = read_file(path)?;
    let sha256 = sha256_hex(&bytes);
    parse_bytes(path, bytes, sha256)
}

/// The content of a state file, or an error naming it.
pub fn read_file(path: &Path) -> Result<Vec<u8>, StateError> {
    std::fs::read(path).map_err(|e| StateError {
        file: path.to_path_buf(),
        problems: vec![Problem::new("file", "-", format!("cannot read: {e}"))],
    })
}

/// AWS JSON is one JSON object; anything else is the native format.
fn is_aws_json(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

/// Parses and validates the content of `path` already read (with its SHA-256).
pub fn parse_bytes(path: &Path, bytes: Vec<u8>, sha256: String) -> Result<LoadedState, StateError> {
    let state = parse_text(path, &bytes)?;
    Ok(LoadedState { state, sha256 })
}

/// Parses and validates the content of `path` already read.
pub fn parse_text(path: &Path, bytes: &[u8]) -> Result<State, StateError> {
    let text = std::str::from_utf8(bytes).map_err(|_| StateError {
        file: path.to_path_buf(),
        problems: vec![Problem::new("file", "-", "is not UTF-8 text")],
    })?;
    parse_str(text).map_err(|problems| StateError {
        file: path.to_path_buf(),
        problems,
    })
}

/// Parses and validates state text in either format.
pub fn parse_str(text: &str) -> Result<State, Vec<Problem>> {
    let (state, lines) = if is_aws_json(text) {
        (aws::parse(text)?, ObjectLines::default())
    } else {
        native::parse(text)?
    };
    let state = resolve_peer_kinds(state);
    let mut problems = state.validate();
    if problems.is_empty() {
        return Ok(state);
    }
    for p in &mut problems {
        p.line = p.line.or_else(|| lines.get(&state, &p.object));
    }
    Err(problems)
}

/// A peer id that names a prefix list is a prefix-list reference, whatever its spelling
/// (and likewise for groups): ids are resolved against the whole state.
fn resolve_peer_kinds(mut state: State) -> State {
    let groups: std::collections::BTreeSet<String> =
        state.security_groups.iter().map(|g| g.id.clone()).collect();
    let lists: std::collections::BTreeSet<String> =
        state.prefix_lists.iter().map(|p| p.id.clone()).collect();
    for g in &mut state.security_groups {
        for rule in g.ingress.iter_mut().chain(g.egress.iter_mut()) {
            for peer in &mut rule.peers {
                match peer {
                    Peer::Group(id) if !groups.contains(id) && lists.contains(id) => {
                        *peer = Peer::PrefixList(id.clone())
                    }
                    Peer::PrefixList(id) if !lists.contains(id) && groups.contains(id) => {
                        *peer = Peer::Group(id.clone())
                    }
                    _ => {}
                }
            }
        }
    }
    state
}

/// Lines where objects start: by name for groups and prefix lists, by position for the
/// (many) interfaces, whose names are only built when a problem needs them.
#[derive(Default)]
struct ObjectLines {
    named: BTreeMap<String, usize>,
    interfaces: Vec<usize>,
}

impl ObjectLines {
    fn get(&self, state: &State, object: &str) -> Option<usize> {
        if let Some(l) = self.named.get(object) {
            return Some(*l);
        }
        let id = object.strip_prefix("network interface ")?;
        let at = state.network_interfaces.iter().position(|n| n.id == id)?;
        self.interfaces.get(at).copied()
    }
}

/// Line numbers of byte offsets, found by binary search over the line starts (a state
/// of 100k objects must not cost 100k scans of the file).
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Lines {
        Lines(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i)
                .collect(),
        )
    }

    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|nl| *nl < offset) + 1
    }
}

/// A peer string: a CIDR, else a prefix list id (`pl-…`), else a group id.
fn parse_peer(s: &str) -> Result<Peer, String> {
    let s = s.trim();
    if s.contains('/') {
        return s.parse::<Cidr>().map(Peer::Cidr).map_err(|e| e.to_string());
    }
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "{s:?} is an address, not a CIDR: write {s}/32 (or /128)"
        ));
    }
    if s.is_empty() {
        return Err("empty peer".into());
    }
    if s.starts_with("pl-") {
        Ok(Peer::PrefixList(s.to_string()))
    } else {
        Ok(Peer::Group(s.to_string()))
    }
}

fn normalize_mac(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || u8::from_str_radix(p, 16).is_err())
    {
        return Err(format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    Ok(parts.join(":").to_ascii_lowercase())
}

/// The native format: TOML, documented in docs/state-format.md.
mod native {
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
                format!("unknown protocol {shown}; use tcp, udp, icmp, icmpv6, all (-1) or a number 0-255"),
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
                        Some(n) => u8::try_from(n).map(Some).map_err(|_| {
                            (format!("{at}.{name}"), format!("{n} is not -1 or 0-255"))
                        }),
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
}

/// AWS JSON: `SecurityGroups`, `NetworkInterfaces`, `ManagedPrefixLists` with the shapes
/// of the EC2 API outputs. Unknown keys are ignored; a missing list is empty.
mod aws {
    use super::*;

    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct File {
        #[serde(default)]
        security_groups: Vec<Group>,
        #[serde(default)]
        network_interfaces: Vec<Interface>,
        #[serde(default)]
        managed_prefix_lists: Vec<ManagedPrefixList>,
    }

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
        let file: File = serde_json::from_str(text).map_err(|e| {
            let mut p = Problem::new("file", "syntax", e.to_string());
            p.line = Some(e.line());
            vec![p]
        })?;
        let mut problems = Vec::new();
        let mut state = State::default();
        for g in file.security_groups {
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
        for n in file.network_interfaces {
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
            let port =
                |v: Option<i64>, name: &str, default: u16| -> Result<u16, (String, String)> {
                    match v {
                        None | Some(-1) => Ok(default),
                        Some(n) => u16::try_from(n).map_err(|_| {
                            (format!("{at}.{name}"), format!("{n} is not a port 0-65535"))
                        }),
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
}
