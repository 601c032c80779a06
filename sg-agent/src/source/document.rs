//! A state file kept with the byte span of every network interface in it, so that a
//! change confined to a few interfaces (a member joining or leaving a group: the change a
//! large state sees most) re-parses and re-validates only them.
//!
//! The old and new content share a prefix and a suffix. When the bytes between them lie
//! within a run of whole interface items, the new bytes of that run are parsed on their
//! own; text that parses on its own as a non-empty list of interfaces stands for the same
//! interfaces in the file (JSON array items and TOML `[[interface]]` tables do not depend
//! on their neighbours), so the new state is the old one with that run replaced. Anything
//! else (a group, a prefix list, the structure around the list, an invalid interface)
//! falls back to parsing the whole file.

#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::IpAddr,
    ops::Range,
    path::Path,
};

use super::{aws, native, StateError};
use crate::model::{NetworkInterface, State};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Native,
    Aws,
}

/// The content of the applied state file and where its interfaces are.
#[derive(Debug)]
pub struct Document {
    text: Vec<u8>,
    format: Format,
    /// Byte spans of the state's network interfaces, in order. Native items run from
    /// their `[[interface]]` header to the next header of something else.
    spans: Vec<Range<usize>>,
    /// How many interfaces have each id and each MAC address (by hash: a collision costs
    /// a full parse, never a wrong answer) and each address: uniqueness and membership
    /// are answered without a pass over every interface.
    ids: HashMap<u64, u32>,
    macs: HashMap<u64, u32>,
    addresses: HashMap<IpAddr, u32>,
}

fn hash_of(s: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// Network interfaces `at..at + added` of the new state replaced `removed`.
#[derive(Debug, Default)]
pub struct InterfaceChange {
    pub at: usize,
    pub removed: Vec<NetworkInterface>,
    pub added: usize,
}

impl Document {
    /// Reads, parses and validates a whole state file.
    pub fn load(path: &Path) -> Result<(Document, State), StateError> {
        Document::parse(path, super::read_file(path)?)
    }

    /// Parses and validates a whole state file (content already read).
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<(Document, State), StateError> {
        let state = super::parse_text(path, &bytes)?;
        Ok((Document::new(bytes, &state), state))
    }

    /// The document of `text`, which parsed into `state`. When its interfaces cannot be
    /// located exactly, no spans are kept and every change parses the whole file.
    pub fn new(text: Vec<u8>, state: &State) -> Document {
        let format = if super::is_aws_json(super::without_bom(
            std::str::from_utf8(&text).unwrap_or_default(),
        )) {
            Format::Aws
        } else {
            Format::Native
        };
        let spans = match format {
            Format::Aws => json_interface_spans(&text),
            Format::Native => toml_interface_spans(&text),
        }
        .filter(|s| s.len() == state.network_interfaces.len())
        .unwrap_or_default();
        let mut doc = Document {
            text,
            format,
            spans,
            ids: HashMap::new(),
            macs: HashMap::new(),
            addresses: HashMap::new(),
        };
        if !doc.spans.is_empty() {
            doc.count(&state.network_interfaces, true);
        }
        doc
    }

    /// How many interfaces of the state hold `addr`.
    pub fn holders(&self, addr: &IpAddr) -> u32 {
        self.addresses.get(addr).copied().unwrap_or(0)
    }

    /// Counts `items` in (or out of) the indexes.
    fn count(&mut self, items: &[NetworkInterface], add: bool) {
        fn bump<K: Hash + Eq>(map: &mut HashMap<K, u32>, key: K, add: bool) {
            if add {
                *map.entry(key).or_default() += 1;
            } else if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
        for n in items {
            bump(&mut self.ids, hash_of(&n.id), add);
            if let Some(mac) = &n.mac {
                bump(&mut self.macs, hash_of(mac), add);
            }
            for a in n.addresses() {
                bump(&mut self.addresses, a, add);
            }
        }
    }

    /// Whether the ids, MAC addresses and private addresses of `items` are used by no
    /// other interface.
    fn unique(&self, items: &[NetworkInterface]) -> bool {
        items.iter().all(|n| {
            self.ids.get(&hash_of(&n.id)) == Some(&1)
                && n.mac
                    .as_ref()
                    .is_none_or(|m| self.macs.get(&hash_of(m)) == Some(&1))
                && n.addresses().all(|a| self.addresses.get(&a) == Some(&1))
        })
    }

    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// Applies new content to `state` when only network interfaces changed and the new
    /// ones are valid; returns what changed. Gives the content back (state untouched)
    /// when the whole file must be parsed.
    pub fn update(&mut self, state: &mut State, new: Vec<u8>) -> Result<InterfaceChange, Vec<u8>> {
        match self.splice(state, &new) {
            Some(change) => {
                self.text = new;
                Ok(change)
            }
            None => Err(new),
        }
    }

    /// The work of `update`, but for storing the new content.
    fn splice(&mut self, state: &mut State, new: &[u8]) -> Option<InterfaceChange> {
        let old = &self.text;
        if self.spans.is_empty() {
            return None;
        }
        let prefix = common_prefix(old, new);
        let room = old.len().min(new.len()) - prefix;
        let suffix = common_suffix(&old[old.len() - room..], &new[new.len() - room..]);
        if prefix == old.len() && prefix == new.len() {
            return Some(InterfaceChange::default());
        }
        let old_len = old.len();
        let (p, q) = (prefix, old_len - suffix);
        // The item holding the start of the change and the one holding its end.
        let first = self
            .spans
            .partition_point(|s| s.start <= p)
            .checked_sub(1)?;
        let last = self.spans.partition_point(|s| s.end < q);
        if last >= self.spans.len() {
            return None;
        }
        let (lo, hi) = (first.min(last), first.max(last));
        let start = self.spans[lo].start;
        let old_end = self.spans[hi].end;
        let new_end = (old_end + new.len()).checked_sub(old_len)?;
        if new_end < start {
            return None;
        }
        let slice = std::str::from_utf8(&new[start..new_end]).ok()?;
        let (items, spans) = match self.format {
            // The changed items are gone and nothing replaces them: a removal.
            _ if slice.is_empty() => (vec![], vec![]),
            Format::Aws => {
                let items = aws::parse_interfaces(slice)?;
                let spans = json_list_spans(slice.as_bytes())?;
                (items, spans)
            }
            Format::Native => {
                // The next header must start a line of its own.
                if new_end < new.len() && !slice.ends_with('\n') {
                    return None;
                }
                let items = native::parse_interfaces(slice)?;
                let spans = toml_interface_spans(slice.as_bytes())?;
                // Text before the first header would belong to the previous table.
                if !slice[..spans.first()?.start].trim().is_empty() {
                    return None;
                }
                (items, spans)
            }
        };
        if items.len() != spans.len() {
            return None;
        }
        let added = items.len();
        let removed: Vec<NetworkInterface> =
            state.network_interfaces.splice(lo..=hi, items).collect();
        let items = &state.network_interfaces[lo..lo + added];
        self.count(&removed, false);
        self.count(items, true);
        if !self.unique(items) || !state.check_interfaces(lo..lo + added).is_empty() {
            self.count(items, false);
            self.count(&removed, true);
            state.network_interfaces.splice(lo..lo + added, removed);
            return None;
        }
        let delta = new.len() as isize - old_len as isize;
        let shifted = |s: &Range<usize>| {
            (s.start as isize + delta) as usize..(s.end as isize + delta) as usize
        };
        let tail: Vec<Range<usize>> = self.spans[hi + 1..].iter().map(shifted).collect();
        self.spans.truncate(lo);
        self.spans
            .extend(spans.into_iter().map(|s| s.start + start..s.end + start));
        // Native items tile the text: the first new one starts where the old one did.
        if self.format == Format::Native && added > 0 {
            self.spans[lo].start = start;
        }
        self.spans.extend(tail);
        Some(InterfaceChange {
            at: lo,
            removed,
            added,
        })
    }
}

/// Length of the common prefix of `a` and `b`, found block by block.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 256;
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[i..i + BLOCK] == b[i..i + BLOCK] {
        i += BLOCK;
    }
    i + a[i..n]
        .iter()
        .zip(&b[i..n])
        .take_while(|(x, y)| x == y)
        .count()
}

/// Length of the common suffix of `a` and `b` (of equal length), block by block.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 256;
    let n = a.len();
    let mut i = 0;
    while i + BLOCK <= n && a[n - i - BLOCK..n - i] == b[n - i - BLOCK..n - i] {
        i += BLOCK;
    }
    i + a[..n - i]
        .iter()
        .rev()
        .zip(b[..n - i].iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

/// Index after the JSON whitespace at `i`.
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// Index after the JSON string starting at `i` (a `"`).
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Index after the JSON value starting at `i`.
fn skip_value(b: &[u8], mut i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            while i < b.len() {
                match b[i] {
                    b'"' => {
                        i = skip_string(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            while i < b.len() && !matches!(b[i], b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r')
            {
                i += 1;
            }
            Some(i)
        }
    }
}

/// Spans of the items of the JSON array whose `[` is at `i`, and the index after it.
fn json_array_items(b: &[u8], mut i: usize) -> Option<(Vec<Range<usize>>, usize)> {
    if b.get(i) != Some(&b'[') {
        return None;
    }
    let mut items = Vec::new();
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b']') {
        return Some((items, i + 1));
    }
    loop {
        let end = skip_value(b, i)?;
        items.push(i..end);
        i = skip_ws(b, end);
        match b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b']' => return Some((items, i + 1)),
            _ => return None,
        }
    }
}

/// Spans of the items of the top-level `NetworkInterfaces` list of an AWS JSON state.
fn json_interface_spans(b: &[u8]) -> Option<Vec<Range<usize>>> {
    json_top_level_items(b, b"NetworkInterfaces")
}

/// Spans of the items of the top-level list `key` of a JSON object (empty when the key
/// is absent); None when the text is not one object this scanner can follow.
pub(super) fn json_top_level_items(b: &[u8], wanted: &[u8]) -> Option<Vec<Range<usize>>> {
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    let mut found = None;
    i = skip_ws(b, i + 1);
    while b.get(i) == Some(&b'"') {
        let key_end = skip_string(b, i)?;
        let key = &b[i + 1..key_end - 1];
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        if key == wanted {
            if found.is_some() {
                return None;
            }
            let (items, end) = json_array_items(b, i)?;
            found = Some(items);
            i = end;
        } else {
            i = skip_value(b, i)?;
        }
        i = skip_ws(b, i);
        if b.get(i) == Some(&b',') {
            i = skip_ws(b, i + 1);
        }
    }
    (b.get(i) == Some(&b'}')).then_some(found.unwrap_or_default())
}

/// Spans of the items of a comma-separated list of JSON values (an array's inside).
fn json_list_spans(b: &[u8]) -> Option<Vec<Range<usize>>> {
    let mut wrapped = Vec::with_capacity(b.len() + 2);
    wrapped.push(b'[');
    wrapped.extend_from_slice(b);
    wrapped.push(b']');
    let (items, end) = json_array_items(&wrapped, 0)?;
    (end == wrapped.len()).then(|| items.into_iter().map(|s| s.start - 1..s.end - 1).collect())
}

/// Where a TOML line scanner is between lines.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lex {
    Top,
    /// Inside a multi-line basic (`"""`) or literal (`'''`) string.
    MultiLine(u8),
}

/// Spans of the `[[interface]]` tables of a native state: from the header to the next
/// header that is not the interface's own sub-table (`[interface.timeouts]`), or the end.
/// None when the text has a header this scanner cannot name for certain.
pub(super) fn toml_interface_spans(b: &[u8]) -> Option<Vec<Range<usize>>> {
    let mut spans = Vec::new();
    let mut open: Option<usize> = None;
    let mut lex = Lex::Top;
    let mut depth = 0usize;
    let mut line_start = 0;
    while line_start < b.len() {
        let line_end = b[line_start..]
            .iter()
            .position(|c| *c == b'\n')
            .map_or(b.len(), |n| line_start + n + 1);
        let line = &b[line_start..line_end];
        let text = std::str::from_utf8(line).ok()?.trim_start();
        if lex == Lex::Top && depth == 0 && text.starts_with('[') {
            let close = text.find(']')?;
            let double = text.starts_with("[[");
            let name = text[if double { 2 } else { 1 }..close].trim();
            if name.contains(['"', '\'']) {
                return None;
            }
            let is_item = double && name == "interface";
            let is_sub = name.starts_with("interface.") || name.starts_with("interface .");
            if is_item || !is_sub {
                if let Some(s) = open.take() {
                    spans.push(s..line_start);
                }
            }
            if is_item {
                open = Some(line_start);
            } else if is_sub && open.is_none() {
                return None;
            }
        } else {
            scan_toml_line(line, &mut lex, &mut depth)?;
        }
        line_start = line_end;
    }
    if lex != Lex::Top || depth != 0 {
        return None;
    }
    if let Some(s) = open {
        spans.push(s..b.len());
    }
    Some(spans)
}

/// Follows strings, comments and brackets through one line of key/value text.
fn scan_toml_line(line: &[u8], lex: &mut Lex, depth: &mut usize) -> Option<()> {
    let mut i = 0;
    while i < line.len() {
        if let Lex::MultiLine(q) = *lex {
            if q == b'"' && line[i] == b'\\' {
                i += 2;
                continue;
            }
            if line[i] == q && line[i..].starts_with(&[q, q, q]) {
                // Up to two quotes may end the content right before the delimiter.
                let run = line[i..].iter().take_while(|c| **c == q).count();
                if run > 5 {
                    return None;
                }
                *lex = Lex::Top;
                i += run;
                continue;
            }
            i += 1;
            continue;
        }
        match line[i] {
            b'#' => return Some(()),
            q @ (b'"' | b'\'') => {
                if line[i..].starts_with(&[q, q, q]) {
                    *lex = Lex::MultiLine(q);
                    i += 3;
                    continue;
                }
                i += 1;
                while i < line.len() && line[i] != q {
                    if q == b'"' && line[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                if i >= line.len() {
                    return None;
                }
            }
            b'[' | b'{' => *depth += 1,
            b']' | b'}' => *depth = depth.checked_sub(1)?,
            _ => {}
        }
        i += 1;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_spans_are_the_items() {
        let text = br#" { "SecurityGroups": [{"GroupId": "sg-1"}], "NetworkInterfaces" : [ {"a": "}]"} , {"b": [1, {"c": "\""}]}] , "X": 1 } "#;
        let spans = json_interface_spans(text).unwrap();
        let items: Vec<&str> = spans
            .iter()
            .map(|s| std::str::from_utf8(&text[s.clone()]).unwrap())
            .collect();
        assert_eq!(items, [r#"{"a": "}]"}"#, r#"{"b": [1, {"c": "\""}]}"#]);
    }

    #[test]
    fn toml_spans_skip_strings_and_arrays() {
        let text = "[[security_group]]\nid = \"a\"\ningress = [\n  { protocol = \"tcp\", from = [\"x\"], description = \"\"\"\n[[interface]]\n\"\"\" },\n]\n\n[[interface]] # one\nid = \"e1\"\n[interface.timeouts]\ntcp_established = 5\n\n[[prefix_list]]\nid = \"pl-1\"\nfamily = \"ipv4\"\n[[interface]]\nid = \"e2\"\n";
        let spans = toml_interface_spans(text.as_bytes()).unwrap();
        let items: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(
            items,
            [
                "[[interface]] # one\nid = \"e1\"\n[interface.timeouts]\ntcp_established = 5\n\n",
                "[[interface]]\nid = \"e2\"\n"
            ]
        );
    }
}
