//! State sources. A `Source` yields the desired state's content; `FileSource` reads a
//! local file (the etcd source joins it). The content is the native TOML format
//! (`native`) or AWS JSON (`aws`, the shapes of the EC2 Describe* outputs), chosen by
//! content; `document` keeps an applied file with its interfaces located for the
//! membership path. Parsing turns text into `model::State`; every problem, from syntax to
//! references, is reported at once with the file, object and field (`error`).

#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use serde::Deserialize;
use sha2::{Digest, Sha256};

mod aws;
mod document;
mod error;
pub mod etcd;
mod file;
mod native;

pub use aws::to_aws_json;
pub use document::{Document, InterfaceChange};
pub use error::StateError;
pub use file::FileSource;

use crate::{
    model::{
        group_object, interface_object, prefix_list_object, rule_rank, Direction, NetworkInterface,
        Origins, Peer, PortMatch, PrefixList, Problem, Protocol, Rule, RuleOrigin, SecurityGroup,
        Settings, State,
    },
    net::{Cidr, Family},
};

/// Problems of one part of a file: (field, message) pairs, in the order found.
type FieldErrors = Vec<(String, String)>;

/// Where the desired state comes from: a file here, etcd for fleets. The agent reads the
/// whole content and parses it with the format chosen by content.
pub trait Source {
    /// What the source is, for logs and status: a file path, etcd endpoints.
    fn describe(&self) -> String;
    /// The state's content as it is now.
    fn read(&mut self) -> Result<Vec<u8>, StateError>;
}

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

/// The content of a state file, or an error naming it. Only a regular file (or a link
/// to one) is read: a FIFO or a device would block or never end.
pub fn read_file(path: &Path) -> Result<Vec<u8>, StateError> {
    let error = |message: String| StateError {
        file: path.to_path_buf(),
        problems: vec![Problem::new("file", "-", message)],
    };
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            return Err(error(format!(
                "is not a regular file ({}); give the path of the state file",
                if m.is_dir() {
                    "a directory"
                } else {
                    "a FIFO, socket or device"
                }
            )))
        }
        Err(e) => return Err(error(format!("cannot read: {e}"))),
        Ok(_) => {}
    }
    std::fs::read(path).map_err(|e| error(format!("cannot read: {e}")))
}

/// AWS JSON is one JSON value: an object, or an array of objects (refused with a clear
/// message, not read as TOML, whose tables also open with `[`); anything else is the
/// native format.
fn is_aws_json(text: &str) -> bool {
    let t = text.trim_start();
    t.starts_with('{') || is_json_array(t)
}

fn is_json_array(text: &str) -> bool {
    text.strip_prefix('[')
        .map(str::trim_start)
        .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(']'))
}

/// Text without a UTF-8 byte-order mark (editors on some systems write one).
fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
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

/// Parses state text in either format without checking it as a whole (references,
/// uniqueness): for a part of a state, such as the file of `publish --merge`, which is
/// validated once merged. Syntax and field problems are still errors.
pub fn parse_part(text: &str) -> Result<State, Vec<Problem>> {
    let text = without_bom(text);
    let parsed = if is_aws_json(text) {
        aws::parse(text)
    } else {
        native::parse(text)
    };
    parsed.map(|(state, _, _)| state).map_err(in_file_order)
}

/// Validates a state assembled from parts (peer kinds resolved against the whole).
pub fn validate_whole(state: State) -> Result<State, Vec<Problem>> {
    let state = resolve_peer_kinds(state);
    let problems = state.validate();
    if problems.is_empty() {
        Ok(state)
    } else {
        Err(in_file_order(problems))
    }
}

/// Parses and validates state text in either format.
pub fn parse_str(text: &str) -> Result<State, Vec<Problem>> {
    let text = without_bom(text);
    let parsed = if is_aws_json(text) {
        aws::parse(text)
    } else {
        native::parse(text)
    };
    let (state, lines, origins) = parsed.map_err(in_file_order)?;
    let state = resolve_peer_kinds(state);
    let mut problems = state.validate_named(&origins);
    if problems.is_empty() {
        return Ok(state);
    }
    for p in &mut problems {
        p.line = p.line.or_else(|| lines.get(&state, &p.object));
    }
    Err(in_file_order(problems))
}

/// Problems in the order of the file: by line, then by place within the object, then
/// as found; each once.
fn in_file_order(mut problems: Vec<Problem>) -> Vec<Problem> {
    problems.sort_by_key(|p| (p.line.unwrap_or(0), p.rank));
    let mut seen = std::collections::HashSet::new();
    problems.retain(|p| seen.insert((p.object.clone(), p.field.clone(), p.message.clone())));
    problems
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
