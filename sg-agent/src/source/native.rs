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

/// A value written as a string or a whole number (protocols, ports, ICMP fields). Its
/// own visitor, so a wrong type says what is expected in the user's terms.
enum StrOrInt {
    Str(String),
    Int(i64),
}

impl<'de> Deserialize<'de> for StrOrInt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = StrOrInt;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a whole number")
            }
            fn visit_i64<E>(self, v: i64) -> Result<StrOrInt, E> {
                Ok(StrOrInt::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<StrOrInt, E> {
                i64::try_from(v)
                    .map(StrOrInt::Int)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_str<E>(self, v: &str) -> Result<StrOrInt, E> {
                Ok(StrOrInt::Str(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl StrOrInt {
    fn shown(&self) -> String {
        match self {
            StrOrInt::Str(s) => format!("{s:?}"),
            StrOrInt::Int(n) => n.to_string(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    protocol: StrOrInt,
    #[serde(default)]
    ports: Option<StrOrInt>,
    #[serde(default)]
    icmp_type: Option<StrOrInt>,
    #[serde(default)]
    icmp_code: Option<StrOrInt>,
    #[serde(default)]
    from: Vec<String>,
    #[serde(default)]
    to: Vec<String>,
    #[serde(default)]
    description: Option<String>,
    /// A stable rule id of the operator's choice (`sgr-…`).
    #[serde(default)]
    id: Option<String>,
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
    #[serde(default)]
    audit: bool,
    #[serde(default)]
    owner_id: Option<String>,
}

/// Interfaces parsed per part when a large native state is parsed in parts.
const PART: usize = 512;

pub fn parse(text: &str) -> Result<(State, super::ObjectLines, Origins), Vec<Problem>> {
    match parse_in_parts(text) {
        Some(parsed) => Ok(parsed),
        None => parse_whole(text),
    }
}

/// The file in one parse.
fn parse_whole(text: &str) -> Result<(State, super::ObjectLines, Origins), Vec<Problem>> {
    let file: File = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| super::Lines::new(text).line(s.start));
        let mut p = Problem::new("file", "syntax", super::aws::friendly(e.message().trim()));
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
    let index = super::Lines::new(text);
    let (mut state, mut lines, origins, mut problems) =
        head(file.settings, file.groups, file.prefix_lists, |at| {
            index.line(at)
        });
    for n in file.interfaces {
        let line = index.line(n.id.span().start);
        lines.interfaces.push(line);
        state
            .network_interfaces
            .push(interface(n, Some(line), &mut problems));
    }
    if problems.is_empty() {
        Ok((state, lines, origins))
    } else {
        // Report structural problems together with what validation finds.
        problems.extend(state.validate_named(&origins).into_iter().map(|mut p| {
            p.line = lines.get(&state, &p.object);
            p
        }));
        Err(problems)
    }
}

/// A large valid state parsed as a stream: the text outside the `[[interface]]` tables
/// in one parse, then the interfaces `PART` at a time, each part's parse tree dropped
/// before the next, so the parser's memory is that of one part and not of the whole file
/// (a TOML parse tree is tens of times its text). The result is the whole parse's: the
/// same items in the same order with the same lines. None, and the caller parses the
/// whole file, for a small file, one whose tables cannot be located for certain, or any
/// problem at all (so every error is reported exactly as the whole parse reports it).
fn parse_in_parts(text: &str) -> Option<(State, super::ObjectLines, Origins)> {
    let spans = super::document::toml_interface_spans(text.as_bytes())?;
    if spans.len() <= PART {
        return None;
    }
    // The rest of the file, with where each of its pieces starts in `text`.
    let mut rest = String::new();
    let mut pieces: Vec<(usize, usize)> = Vec::with_capacity(spans.len() + 1);
    let mut at = 0;
    for s in spans
        .iter()
        .chain(std::iter::once(&(text.len()..text.len())))
    {
        pieces.push((rest.len(), at));
        rest.push_str(text.get(at..s.start)?);
        at = s.end;
    }
    let in_text = |pieces: &[(usize, usize)], p: usize| {
        let i = pieces
            .partition_point(|(from, _)| *from <= p)
            .saturating_sub(1);
        pieces[i].1 + (p - pieces[i].0)
    };
    let index = super::Lines::new(text);
    let file: File = toml::from_str(&rest).ok()?;
    if !file.interfaces.is_empty() {
        return None;
    }
    let (mut state, mut lines, origins, mut problems) =
        head(file.settings, file.groups, file.prefix_lists, |p| {
            index.line(in_text(&pieces, p))
        });
    if !problems.is_empty() {
        return None;
    }
    drop(rest);
    state.network_interfaces.reserve_exact(spans.len());
    lines.interfaces.reserve_exact(spans.len());
    let mut part = String::new();
    let mut starts: Vec<(usize, usize)> = Vec::with_capacity(PART);
    for chunk in spans.chunks(PART) {
        part.clear();
        starts.clear();
        for s in chunk {
            starts.push((part.len(), s.start));
            part.push_str(text.get(s.clone())?);
            if !part.ends_with('\n') {
                part.push('\n');
            }
        }
        let file: File = toml::from_str(&part).ok()?;
        if file.interfaces.len() != chunk.len()
            || file.settings.is_some()
            || !file.groups.is_empty()
            || !file.prefix_lists.is_empty()
        {
            return None;
        }
        for n in file.interfaces {
            let line = index.line(in_text(&starts, n.id.span().start));
            lines.interfaces.push(line);
            state
                .network_interfaces
                .push(interface(n, Some(line), &mut problems));
        }
        if !problems.is_empty() {
            return None;
        }
    }
    Some((state, lines, origins))
}

/// Settings, groups and prefix lists: the state without its interfaces, where each
/// object is (by `line_of` a position of the parsed text) and the problems found.
fn head(
    settings: Option<RawSettings>,
    groups: Vec<RawGroup>,
    prefix_lists: Vec<RawPrefixList>,
    line_of: impl Fn(usize) -> usize,
) -> (State, super::ObjectLines, Origins, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut origins = Origins::default();
    let mut lines = super::ObjectLines::default();
    let mut state = State {
        settings: Settings {
            timeouts: settings.map(|s| s.timeouts).unwrap_or_default(),
        },
        ..State::default()
    };
    for g in groups {
        let id = g.id.get_ref().clone();
        let object = group_object(&id);
        let line = line_of(g.id.span().start);
        lines.named.insert(object.clone(), line);
        let _ = g.description;
        let gi = state.security_groups.len();
        let mut rules = |raw: Vec<RawRule>, dir: Direction| -> Vec<Rule> {
            let mut out = Vec::new();
            for (i, r) in raw.into_iter().enumerate() {
                let (rule, errors) = rule(r, dir, i);
                let rank = rule_rank(dir, i);
                for (field, msg) in errors {
                    let mut p = Problem::new(&object, field, msg);
                    p.line = Some(line);
                    p.rank = rank;
                    problems.push(p);
                }
                // A rule with problems is kept with its well-formed peers only, so that
                // their references are checked too; the state is refused anyway.
                if let Some((rule, origin)) = rule {
                    origins.rules.insert((gi, dir, out.len()), origin);
                    out.push(rule);
                }
            }
            out
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
    for p in prefix_lists {
        let id = p.id.get_ref().clone();
        let object = prefix_list_object(&id);
        let line = line_of(p.id.span().start);
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
    (state, lines, origins, problems)
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
        audit: n.audit,
        owner_id: n.owner_id,
    }
}

/// One rule of the file (rule `index` of `dir`) with its origin, and every problem it has
/// on its own.
fn rule(r: RawRule, dir: Direction, index: usize) -> (Option<(Rule, RuleOrigin)>, FieldErrors) {
    let at = format!("{dir}[{index}]");
    let mut errors = Vec::new();
    let protocol = match &r.protocol {
        StrOrInt::Str(s) => Protocol::parse(s),
        StrOrInt::Int(-1) => Some(Protocol::All),
        StrOrInt::Int(n) => u8::try_from(*n).ok().map(Protocol::Number),
    };
    if protocol.is_none() {
        errors.push((
            format!("{at}.protocol"),
            format!(
                "unknown protocol {}; use tcp, udp, icmp, icmpv6, all (-1) or a number 0-255",
                r.protocol.shown()
            ),
        ));
    }
    let icmp_field = |v: &Option<StrOrInt>, name: &str, errors: &mut Vec<(String, String)>| match v
    {
        None | Some(StrOrInt::Int(-1)) => None,
        Some(StrOrInt::Int(n)) => match u8::try_from(*n) {
            Ok(v) => Some(v),
            Err(_) => {
                errors.push((format!("{at}.{name}"), format!("{n} is not -1 or 0-255")));
                None
            }
        },
        Some(StrOrInt::Str(s)) => {
            errors.push((
                format!("{at}.{name}"),
                format!("{s:?} is not a number: write -1 (any) or 0-255"),
            ));
            None
        }
    };
    let ports = match (&r.ports, &r.icmp_type, &r.icmp_code) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            errors.push((
                format!("{at}.ports"),
                "give either ports or icmp_type/icmp_code, not both".into(),
            ));
            PortMatch::Any
        }
        (Some(p), None, None) => {
            if protocol.is_some_and(|p| !p.has_ports()) {
                errors.push((
                    format!("{at}.ports"),
                    format!(
                        "ports apply only to tcp and udp, not {}",
                        protocol.expect("checked")
                    ),
                ));
            }
            match parse_ports(p) {
                Ok(ports) => ports,
                Err(m) => {
                    errors.push((format!("{at}.ports"), m));
                    PortMatch::Any
                }
            }
        }
        (None, None, None) => PortMatch::Any,
        (None, t, c) => {
            if protocol.is_some_and(|p| !p.is_icmp()) {
                errors.push((
                    format!("{at}.icmp_type"),
                    format!(
                        "ICMP type and code apply only to icmp and icmpv6, not {}",
                        protocol.expect("checked")
                    ),
                ));
            }
            PortMatch::Icmp {
                icmp_type: icmp_field(t, "icmp_type", &mut errors),
                code: icmp_field(c, "icmp_code", &mut errors),
            }
        }
    };
    let (peers_field, peers, other, other_name) = match dir {
        Direction::Ingress => ("from", &r.from, &r.to, "to"),
        Direction::Egress => ("to", &r.to, &r.from, "from"),
    };
    if !other.is_empty() {
        errors.push((
            format!("{at}.{other_name}"),
            format!("{dir} rules name their peers in {peers_field:?}, not {other_name:?}"),
        ));
    }
    if peers.is_empty() {
        errors.push((
            format!("{at}.{peers_field}"),
            "a rule needs at least one peer".into(),
        ));
    }
    let mut origin = RuleOrigin::native(dir, index, 0);
    let mut out = Vec::new();
    for (j, p) in peers.iter().enumerate() {
        match parse_peer(p) {
            Ok(peer) => {
                out.push(peer);
                origin.peer.push(format!("{at}.{peers_field}[{j}]"));
            }
            Err(m) => errors.push((format!("{at}.{peers_field}[{j}]"), m)),
        }
    }
    // With problems, what is kept is only for checking the peers' references.
    let ok = errors.is_empty();
    let rule = (ok || !out.is_empty()).then(|| {
        let rule = Rule {
            protocol: if ok {
                protocol.expect("no errors")
            } else {
                Protocol::All
            },
            ports: if ok { ports } else { PortMatch::Any },
            peers: out,
            description: r.description,
            id: r.id,
        };
        (rule, origin)
    });
    (rule, errors)
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

#[cfg(test)]
mod parts {
    use super::*;

    /// Equal results of the two ways, objects, lines and rule origins included.
    fn assert_same(text: &str) {
        let (a, al, ao) = parse_in_parts(text).expect("parsed in parts");
        let (b, bl, bo) = parse_whole(text).expect("parsed whole");
        assert_eq!(a, b);
        assert_eq!(al.named, bl.named);
        assert_eq!(al.interfaces, bl.interfaces);
        let sorted = |o: &Origins| {
            let mut v: Vec<String> = o.rules.iter().map(|e| format!("{e:?}")).collect();
            v.sort();
            v
        };
        assert_eq!(sorted(&ao), sorted(&bo));
    }

    fn interfaces(from: usize, to: usize) -> String {
        let mut s = String::new();
        for i in from..to {
            s += &format!(
                "[[interface]] # item {i}\nid = \"eni-{i}\"\nipv4 = [\"198.18.{}.{}\"]\ngroups = [\"sg-a\"]\n",
                i >> 8,
                i & 255
            );
            if i % 11 == 0 {
                s += "audit = true\n\n# a comment\n";
            }
            if i % 7 == 0 {
                s += "\n[interface.timeouts]\ntcp_established = 600\n";
            }
        }
        s
    }

    #[test]
    fn a_large_state_parsed_in_parts_equals_its_whole_parse() {
        let mut text = String::from("# top\n[settings.timeouts]\nudp = 40\n\n[[security_group]]\nid = \"sg-a\"\ndescription = \"\"\"\n[[interface]]\n\"\"\"\ningress = [\n  { protocol = \"tcp\", ports = \"22\", from = [\"sg-a\", \"pl-1\"] },\n]\n");
        text += &interfaces(0, 700);
        text +=
            "[[prefix_list]]\nid = \"pl-1\"\nfamily = \"ipv4\"\nentries = [\"198.19.0.0/16\"]\n\n";
        text += &interfaces(700, 1500);
        text += "[[security_group]]\nid = \"sg-b\"\negress = []\n";
        text += &interfaces(1500, 1600);
        // No newline at the end of the last table.
        text.pop();
        assert_same(&text);
    }

    #[test]
    fn any_problem_or_a_small_file_is_left_to_the_whole_parse() {
        let mut text = String::from("[[security_group]]\nid = \"sg-a\"\n");
        text += &interfaces(0, 10);
        assert!(parse_in_parts(&text).is_none(), "small");
        text += &interfaces(10, 1000);
        assert!(parse_in_parts(&text).is_some());
        for broken in [
            text.replace("id = \"eni-900\"", "id = \"eni-900\"\nunknown = 1"),
            text.replace("ipv4 = [\"198.18.3.132\"]", "ipv4 = [\"not an address\"]"),
            text.replace(
                "[[interface]] # item 901\n",
                "[[interface]] # item 901\nipv4 = [",
            ),
        ] {
            assert!(parse_in_parts(&broken).is_none());
            let whole = parse_whole(&broken).err().expect("an error");
            assert_eq!(super::parse(&broken).err(), Some(whole));
        }
    }
}
