//! The desired state in security-group terms, and its validation.
//!
//! Sources (`source`) parse text into these types; `State::validate` then checks what
//! only the whole state can tell (references, duplicates, ranges) and reports every
//! error at once, each naming the object and the field.

#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use sg_common::ct::{DEFAULT_TIMEOUTS, TIMEOUT_COUNT};

use crate::net::{Cidr, Family};

/// Direction of a rule: ingress rules name a source peer, egress rules a destination.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn code(self) -> u8 {
        match self {
            Direction::Ingress => sg_common::DIR_INGRESS,
            Direction::Egress => sg_common::DIR_EGRESS,
        }
    }

    pub fn opposite(self) -> Direction {
        match self {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// IP protocol of a rule: every protocol (`-1`/`all`) or one protocol number.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Protocol {
    All,
    Number(u8),
}

impl Protocol {
    pub const TCP: Protocol = Protocol::Number(sg_common::PROTO_TCP);
    pub const UDP: Protocol = Protocol::Number(sg_common::PROTO_UDP);
    pub const ICMP: Protocol = Protocol::Number(sg_common::PROTO_ICMP);
    pub const ICMPV6: Protocol = Protocol::Number(sg_common::PROTO_ICMPV6);

    /// Parses the spellings AWS accepts: names, `-1`, and numbers 0–255.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s.trim().to_ascii_lowercase().as_str() {
            "-1" | "all" => Some(Protocol::All),
            "tcp" => Some(Protocol::TCP),
            "udp" => Some(Protocol::UDP),
            "icmp" => Some(Protocol::ICMP),
            "icmpv6" | "icmp6" => Some(Protocol::ICMPV6),
            other => other.parse::<u8>().ok().map(Protocol::Number),
        }
    }

    pub fn has_ports(self) -> bool {
        matches!(
            self,
            Protocol::Number(sg_common::PROTO_TCP | sg_common::PROTO_UDP)
        )
    }

    pub fn is_icmp(self) -> bool {
        matches!(
            self,
            Protocol::Number(sg_common::PROTO_ICMP | sg_common::PROTO_ICMPV6)
        )
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::All => f.write_str("all"),
            Protocol::Number(6) => f.write_str("tcp"),
            Protocol::Number(17) => f.write_str("udp"),
            Protocol::Number(1) => f.write_str("icmp"),
            Protocol::Number(58) => f.write_str("icmpv6"),
            Protocol::Number(n) => write!(f, "{n}"),
        }
    }
}

/// What a rule matches beyond the protocol.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum PortMatch {
    /// Every port, type or code (and protocols without ports).
    Any,
    /// TCP/UDP destination ports, inclusive.
    Ports { from: u16, to: u16 },
    /// ICMP type and code; `None` is `-1` (any).
    Icmp {
        icmp_type: Option<u8>,
        code: Option<u8>,
    },
}

impl PortMatch {
    /// Whether `port` (TCP/UDP destination port, or ICMP `type << 8 | code`) matches.
    pub fn matches(&self, port: u16) -> bool {
        match *self {
            PortMatch::Any => true,
            PortMatch::Ports { from, to } => (from..=to).contains(&port),
            PortMatch::Icmp { icmp_type, code } => {
                icmp_type.is_none_or(|t| t == (port >> 8) as u8)
                    && code.is_none_or(|c| c == (port & 0xff) as u8)
            }
        }
    }

    /// Whether this matches every port 0–65535 (for untracked-flow eligibility).
    pub fn is_all_ports(&self) -> bool {
        match *self {
            PortMatch::Any => true,
            PortMatch::Ports { from, to } => from == 0 && to == u16::MAX,
            PortMatch::Icmp { icmp_type, code } => icmp_type.is_none() && code.is_none(),
        }
    }
}

impl fmt::Display for PortMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |v: Option<u8>| v.map_or("-1".to_string(), |v| v.to_string());
        match *self {
            PortMatch::Any => f.write_str("all"),
            PortMatch::Ports { from, to } if from == to => write!(f, "{from}"),
            PortMatch::Ports { from, to } => write!(f, "{from}-{to}"),
            PortMatch::Icmp { icmp_type, code } => {
                write!(f, "type {} code {}", opt(icmp_type), opt(code))
            }
        }
    }
}

/// The other side of a rule: source for ingress, destination for egress.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Cidr(Cidr),
    Group(String),
    PrefixList(String),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Cidr(c) => write!(f, "{c}"),
            Peer::Group(g) => f.write_str(g),
            Peer::PrefixList(p) => f.write_str(p),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub protocol: Protocol,
    pub ports: PortMatch,
    pub peers: Vec<Peer>,
    pub description: Option<String>,
    /// The rule's `SecurityGroupRuleId` (`sgr-…`) when the input names one; otherwise
    /// the compiler derives a stable one from the rule's content (SPEC §7).
    pub id: Option<String>,
}

impl Rule {
    /// The one egress rule of a new group: all traffic to 0.0.0.0/0 and ::/0 (SPEC §1.2).
    pub fn default_egress() -> Rule {
        Rule {
            protocol: Protocol::All,
            ports: PortMatch::Any,
            peers: vec![Peer::Cidr(Cidr::ANY_V4), Peer::Cidr(Cidr::ANY_V6)],
            description: None,
            id: None,
        }
    }

    /// Whether the rule matches a packet of `protocol` at `port` (ignoring the peer).
    pub fn matches_traffic(&self, protocol: u8, port: u16) -> bool {
        match self.protocol {
            Protocol::All => true,
            Protocol::Number(p) if p != protocol => false,
            Protocol::Number(_) => self.ports.matches(port),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityGroup {
    pub id: String,
    pub name: String,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

impl SecurityGroup {
    pub fn rules(&self, direction: Direction) -> &[Rule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixList {
    pub id: String,
    pub name: String,
    pub family: Family,
    pub entries: Vec<Cidr>,
}

/// A network interface (ENI) and the groups attached to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkInterface {
    pub id: String,
    /// Lower-case `aa:bb:cc:dd:ee:ff`.
    pub mac: Option<String>,
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
    pub groups: Vec<String>,
    /// Conntrack idle timeouts that override the global ones (seconds, by name).
    pub timeouts: BTreeMap<String, u32>,
    /// Audit mode on this interface (SPEC §7): every packet passes, and what would have
    /// been denied is logged and counted as such.
    pub audit: bool,
    /// The AWS account that owns the interface (`OwnerId`), for flow logs' `account-id`.
    pub owner_id: Option<String>,
}

impl NetworkInterface {
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4
            .iter()
            .map(|a| IpAddr::V4(*a))
            .chain(self.ipv6.iter().map(|a| IpAddr::V6(*a)))
    }
}

/// Global settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Conntrack idle timeouts (seconds, by `sg_common::ct::TIMEOUT_NAMES`).
    pub timeouts: BTreeMap<String, u32>,
}

/// The whole desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub security_groups: Vec<SecurityGroup>,
    pub prefix_lists: Vec<PrefixList>,
    pub network_interfaces: Vec<NetworkInterface>,
    pub settings: Settings,
    /// What the source said that is not an error (unknown top-level keys): printed by
    /// `validate` and logged when applied.
    pub warnings: Vec<Problem>,
}

/// One problem in a state: where (object, field) and what.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The object, e.g. `security group sg-web`.
    pub object: String,
    /// The field, e.g. `ingress[1].peers[0]`.
    pub field: String,
    pub message: String,
    /// 1-based line in the source file, where the format has lines and it is known.
    pub line: Option<usize>,
    /// Where in its object the problem lies (`rule_rank`; 0 for the object itself):
    /// problems are reported in file order by (line, rank).
    pub rank: u32,
}

/// The rank of rule `index` of `dir` within its group, for ordering problems.
pub fn rule_rank(dir: Direction, index: usize) -> u32 {
    1 + (dir == Direction::Egress) as u32 * 1_000_000 + index as u32
}

impl Problem {
    pub fn new(
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Problem {
            object: object.into(),
            field: field.into(),
            message: message.into(),
            line: None,
            rank: 0,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        write!(f, "{}: {}: {}", self.object, self.field, self.message)
    }
}

/// Where a rule came from, in its format's own terms: the field of the rule and of each
/// of its parts, so that a problem names what the user wrote (`IpPermissions[2].
/// UserIdGroupPairs[0].GroupId` in AWS JSON, `ingress[2].from[0]` in the native format).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleOrigin {
    /// `rule_rank` of the rule in its file.
    pub rank: u32,
    pub protocol: String,
    pub ports: String,
    pub icmp_type: String,
    pub icmp_code: String,
    /// The field that lists the peers (named when there are none).
    pub peers: String,
    /// The field of each peer, in the rule's peer order.
    pub peer: Vec<String>,
}

/// Whether `id` has the shape of a `SecurityGroupRuleId`.
pub fn valid_rule_id(id: &str) -> bool {
    id.strip_prefix("sgr-").is_some_and(|rest| {
        (1..=32).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    })
}

impl RuleOrigin {
    /// The field that names the rule's id, beside its protocol field.
    fn id_field(&self, aws: bool) -> String {
        let at = self.protocol.rsplit_once('.').map_or("", |(at, _)| at);
        format!("{at}.{}", if aws { "SecurityGroupRuleId" } else { "id" })
    }

    /// The names of the native format for rule `index` of `dir` (also what a state that
    /// did not come from a file is reported in).
    pub fn native(dir: Direction, index: usize, peers: usize) -> RuleOrigin {
        let at = format!("{dir}[{index}]");
        let list = match dir {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
        RuleOrigin {
            rank: rule_rank(dir, index),
            protocol: format!("{at}.protocol"),
            ports: format!("{at}.ports"),
            icmp_type: format!("{at}.icmp_type"),
            icmp_code: format!("{at}.icmp_code"),
            peers: format!("{at}.{list}"),
            peer: (0..peers).map(|j| format!("{at}.{list}[{j}]")).collect(),
        }
    }

    fn peer(&self, j: usize) -> String {
        self.peer
            .get(j)
            .cloned()
            .unwrap_or_else(|| format!("{}[{j}]", self.peers))
    }
}

/// Where a state's fields came from: each rule's origin, by (group index, direction,
/// rule index in the state), and whether interface fields take AWS JSON's names. A rule
/// with no origin is named in the native format's terms.
#[derive(Clone, Debug, Default)]
pub struct Origins {
    pub rules: std::collections::HashMap<(usize, Direction, usize), RuleOrigin>,
    pub aws: bool,
}

impl Origins {
    /// The field of an interface in this format's terms.
    fn interface_field(&self, native: &str) -> String {
        if !self.aws {
            return native.to_string();
        }
        let indexed = |prefix: &str, aws: &str, key: &str| {
            native
                .strip_prefix(prefix)
                .map(|rest| format!("{aws}{rest}.{key}"))
        };
        indexed("ipv4", "PrivateIpAddresses", "PrivateIpAddress")
            .or_else(|| indexed("ipv6", "Ipv6Addresses", "Ipv6Address"))
            .or_else(|| {
                native
                    .strip_prefix("groups[")
                    .map(|rest| format!("Groups[{rest}.GroupId"))
            })
            .unwrap_or_else(|| match native {
                "mac" => "MacAddress".into(),
                "groups" => "Groups".into(),
                "id" => "NetworkInterfaceId".into(),
                other => other.into(),
            })
    }
}

pub fn group_object(id: &str) -> String {
    format!("security group {id}")
}
pub fn interface_object(id: &str) -> String {
    format!("network interface {id}")
}
pub fn prefix_list_object(id: &str) -> String {
    format!("prefix list {id}")
}

impl State {
    pub fn group(&self, id: &str) -> Option<&SecurityGroup> {
        self.security_groups.iter().find(|g| g.id == id)
    }

    pub fn prefix_list(&self, id: &str) -> Option<&PrefixList> {
        self.prefix_lists.iter().find(|p| p.id == id)
    }

    pub fn interface(&self, id: &str) -> Option<&NetworkInterface> {
        self.network_interfaces.iter().find(|n| n.id == id)
    }

    /// Global timeouts with the interface's overrides, in `TIMEOUT_*` slot order.
    pub fn timeouts_for(&self, eni: &NetworkInterface) -> [u32; TIMEOUT_COUNT] {
        let mut t = DEFAULT_TIMEOUTS;
        for (slot, name) in sg_common::ct::TIMEOUT_NAMES.iter().enumerate() {
            if let Some(v) = self.settings.timeouts.get(*name) {
                t[slot] = *v;
            }
            if let Some(v) = eni.timeouts.get(*name) {
                t[slot] = *v;
            }
        }
        t
    }

    /// Every problem of the state; empty when it is valid. Rules are named in the
    /// native format's terms.
    pub fn validate(&self) -> Vec<Problem> {
        self.validate_named(&Origins::default())
    }

    /// Every problem of the state, each rule's fields named as `origins` says.
    pub fn validate_named(&self, origins: &Origins) -> Vec<Problem> {
        let mut problems = Vec::new();
        let groups: BTreeSet<&str> = self.security_groups.iter().map(|g| g.id.as_str()).collect();
        let lists: BTreeMap<&str, &PrefixList> = self
            .prefix_lists
            .iter()
            .map(|p| (p.id.as_str(), p))
            .collect();

        duplicates(
            self.security_groups.iter().map(|g| g.id.as_str()),
            group_object,
            &mut problems,
        );
        duplicates(
            self.prefix_lists.iter().map(|p| p.id.as_str()),
            prefix_list_object,
            &mut problems,
        );
        duplicates(
            self.network_interfaces.iter().map(|n| n.id.as_str()),
            interface_object,
            &mut problems,
        );
        // A group and a prefix list may not share an id: a peer naming it would be
        // ambiguous.
        for p in &self.prefix_lists {
            if groups.contains(p.id.as_str()) {
                problems.push(Problem::new(
                    prefix_list_object(&p.id),
                    "id",
                    format!("{} is also the id of a security group; ids must be unique across groups and prefix lists", p.id),
                ));
            }
        }
        check_timeouts(
            &self.settings.timeouts,
            "settings",
            "timeouts",
            &mut problems,
        );

        let mut rule_ids: BTreeMap<&str, String> = BTreeMap::new();
        for (gi, g) in self.security_groups.iter().enumerate() {
            let object = group_object(&g.id);
            if g.id.is_empty() {
                problems.push(Problem::new(&object, "id", "must not be empty"));
            }
            for dir in Direction::BOTH {
                for (i, rule) in g.rules(dir).iter().enumerate() {
                    let native;
                    let origin = match origins.rules.get(&(gi, dir, i)) {
                        Some(o) => o,
                        None => {
                            native = RuleOrigin::native(dir, i, rule.peers.len());
                            &native
                        }
                    };
                    check_rule(rule, origin, &object, &groups, &lists, &mut problems);
                    if let Some(id) = &rule.id {
                        let field = origin.id_field(origins.aws);
                        if !valid_rule_id(id) {
                            problems.push(Problem::new(
                                &object,
                                &field,
                                format!("{id:?} is not a security group rule id (sgr- followed by 1 to 32 lowercase letters or digits)"),
                            ));
                        } else if let Some(other) = rule_ids.insert(id, g.id.clone()) {
                            problems.push(Problem::new(
                                &object,
                                &field,
                                format!("rule id {id} is also used by a rule of {other}; rule ids must be unique"),
                            ));
                        }
                    }
                }
            }
        }
        for p in &self.prefix_lists {
            let object = prefix_list_object(&p.id);
            for (i, c) in p.entries.iter().enumerate() {
                if c.family() != p.family {
                    problems.push(Problem::new(
                        &object,
                        if origins.aws {
                            format!("Entries[{i}].Cidr")
                        } else {
                            format!("entries[{i}]")
                        },
                        format!(
                            "{c} is not an {} CIDR (AddressFamily is {})",
                            p.family, p.family
                        ),
                    ));
                }
            }
        }
        let mut macs = BTreeMap::new();
        let mut addresses: std::collections::HashMap<IpAddr, &str> =
            std::collections::HashMap::new();
        for n in &self.network_interfaces {
            check_interface(n, &groups, origins, &mut problems);
            if let Some(mac) = &n.mac {
                if let Some(other) = macs.insert(mac.as_str(), n.id.as_str()) {
                    problems.push(Problem::new(
                        interface_object(&n.id),
                        origins.interface_field("mac"),
                        format!("MAC address {mac} is also used by network interface {other}"),
                    ));
                }
            }
            for (field, addr) in address_fields(n) {
                match addresses.get(&addr) {
                    Some(other) if *other != n.id.as_str() => problems.push(Problem::new(
                        interface_object(&n.id),
                        origins.interface_field(&field),
                        format!("{addr} is also a private address of network interface {other}"),
                    )),
                    Some(_) => {} // Listed twice on this interface: check_interface says so.
                    None => {
                        addresses.insert(addr, n.id.as_str());
                    }
                }
            }
        }
        problems
    }

    /// The checks of `validate` that concern one network interface alone (its fields and
    /// references), for the interfaces at `changed`: uniqueness of ids and MAC addresses
    /// is the caller's to check.
    pub fn check_interfaces(&self, changed: std::ops::Range<usize>) -> Vec<Problem> {
        self.check_interfaces_of(&self.network_interfaces[changed])
    }

    /// The same checks for interfaces `items` that are not (yet) in the state.
    pub fn check_interfaces_of(&self, items: &[NetworkInterface]) -> Vec<Problem> {
        let mut problems = Vec::new();
        let groups: BTreeSet<&str> = self.security_groups.iter().map(|g| g.id.as_str()).collect();
        for n in items {
            check_interface(n, &groups, &Origins::default(), &mut problems);
        }
        problems
    }
}

/// The checks of one network interface that need no other interface.
fn check_interface(
    n: &NetworkInterface,
    groups: &BTreeSet<&str>,
    origins: &Origins,
    problems: &mut Vec<Problem>,
) {
    // Object names are built only for problems: a state has 100k interfaces.
    let object = || interface_object(&n.id);
    let name = |native: &str| origins.interface_field(native);
    for (i, g) in n.groups.iter().enumerate() {
        if !groups.contains(g.as_str()) {
            problems.push(Problem::new(
                object(),
                name(&format!("groups[{i}]")),
                format!("unknown security group {g:?}"),
            ));
        }
    }
    let twice = n
        .groups
        .iter()
        .enumerate()
        .any(|(i, g)| n.groups[..i].contains(g));
    if twice {
        problems.push(Problem::new(
            object(),
            name("groups"),
            "lists a security group twice",
        ));
    }
    if n.groups.len() > MAX_GROUPS_PER_INTERFACE {
        problems.push(Problem::new(
            object(),
            name("groups"),
            format!(
                "{} security groups attached; at most {MAX_GROUPS_PER_INTERFACE} are supported",
                n.groups.len()
            ),
        ));
    }
    if !n.timeouts.is_empty() {
        check_timeouts(&n.timeouts, &object(), "timeouts", problems);
    }
    if let Some(mac) = &n.mac {
        let first = u8::from_str_radix(&mac[..2.min(mac.len())], 16).unwrap_or(0);
        if first & 1 == 1 {
            problems.push(Problem::new(
                object(),
                name("mac"),
                format!(
                    "{mac} is a {} address; a network interface has a unicast MAC",
                    if mac == "ff:ff:ff:ff:ff:ff" {
                        "broadcast"
                    } else {
                        "multicast"
                    }
                ),
            ));
        }
    }
    let fields = address_fields(n);
    for (i, (field, addr)) in fields.iter().enumerate() {
        if fields[..i].iter().any(|(_, a)| a == addr) {
            problems.push(Problem::new(
                object(),
                name(field),
                format!("{addr} is listed twice"),
            ));
        }
    }
}

/// Each private address of an interface with the field that holds it (the native
/// format's names; AWS JSON's are `PrivateIpAddresses[i]` and `Ipv6Addresses[i]`).
fn address_fields(n: &NetworkInterface) -> Vec<(String, IpAddr)> {
    n.ipv4
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("ipv4[{i}]"), IpAddr::V4(*a)))
        .chain(
            n.ipv6
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("ipv6[{i}]"), IpAddr::V6(*a))),
        )
        .collect()
}

/// Groups per interface that must work (SPEC §1.8).
pub const MAX_GROUPS_PER_INTERFACE: usize = 16;

fn duplicates<'a>(
    ids: impl Iterator<Item = &'a str>,
    object: fn(&str) -> String,
    problems: &mut Vec<Problem>,
) {
    let mut seen = BTreeSet::new();
    for id in ids {
        if !seen.insert(id) {
            problems.push(Problem::new(object(id), "id", "duplicate id"));
        }
    }
}

fn check_timeouts(
    t: &BTreeMap<String, u32>,
    object: &str,
    field: &str,
    problems: &mut Vec<Problem>,
) {
    for (name, value) in t {
        if !sg_common::ct::TIMEOUT_NAMES.contains(&name.as_str()) {
            problems.push(Problem::new(
                object,
                format!("{field}.{name}"),
                format!(
                    "unknown timeout; known: {}",
                    sg_common::ct::TIMEOUT_NAMES.join(", ")
                ),
            ));
        } else if *value == 0 {
            problems.push(Problem::new(
                object,
                format!("{field}.{name}"),
                "must be at least 1 second",
            ));
        }
    }
}

fn check_rule(
    rule: &Rule,
    at: &RuleOrigin,
    object: &str,
    groups: &BTreeSet<&str>,
    lists: &BTreeMap<&str, &PrefixList>,
    problems: &mut Vec<Problem>,
) {
    let mut problem = |field: &str, message: String| {
        let mut p = Problem::new(object, field, message);
        p.rank = at.rank;
        problems.push(p);
    };
    if let PortMatch::Ports { from, to } = rule.ports {
        if from > to {
            problem(
                &at.ports,
                format!("from port {from} is greater than to port {to}"),
            );
        }
        if !rule.protocol.has_ports() {
            problem(
                &at.ports,
                format!("ports apply only to tcp and udp, not {}", rule.protocol),
            );
        }
    }
    if let PortMatch::Icmp {
        icmp_type: None,
        code: Some(_),
    } = rule.ports
    {
        problem(
            &at.icmp_code,
            "an ICMP code needs an ICMP type (type -1 means every type and code)".into(),
        );
    }
    if matches!(rule.ports, PortMatch::Icmp { .. }) && !rule.protocol.is_icmp() {
        problem(
            &at.icmp_type,
            format!(
                "ICMP type and code apply only to icmp and icmpv6, not {}",
                rule.protocol
            ),
        );
    }
    if rule.peers.is_empty() {
        problem(&at.peers, "a rule needs at least one peer".into());
    }
    // ICMP is IPv4's, ICMPv6 IPv6's: a CIDR of the other family could never match.
    let family = match rule.protocol {
        Protocol::Number(1) => Some(Family::V4),
        Protocol::Number(58) => Some(Family::V6),
        _ => None,
    };
    for (j, peer) in rule.peers.iter().enumerate() {
        match peer {
            Peer::Cidr(c) if family.is_some_and(|f| c.family() != f) => problem(
                &at.peer(j),
                format!(
                    "{c} is an {} CIDR, but {} applies to {} only",
                    c.family(),
                    rule.protocol,
                    family.expect("checked")
                ),
            ),
            Peer::Group(g) if !groups.contains(g.as_str()) => {
                problem(&at.peer(j), format!("unknown security group {g:?}"))
            }
            Peer::PrefixList(p) if !lists.contains_key(p.as_str()) => {
                problem(&at.peer(j), format!("unknown prefix list {p:?}"))
            }
            _ => {}
        }
    }
}
