//! VPC Flow Logs (SPEC §7): one record per flow and direction per aggregation interval,
//! in AWS's format. Accepted traffic comes from the conntrack tables' per-direction
//! packet and byte counters (the difference since the last record); rejected traffic from
//! the datapath's denial events, which the kernel rate-limits. What the kernel left out
//! (rate limit, full ring) is counted per interface and reported as `SKIPDATA`.

#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use sg_common::{counter, Counters, CtKey, DIR_EGRESS, DIR_INGRESS};

use crate::{
    datapath::{addr_of, FlowRow},
    events::{Event, Labels},
    model::Direction,
};

#[derive(Clone, Debug)]
pub struct Options {
    /// File to append to, or `-` for stdout.
    pub path: PathBuf,
    pub format: Format,
    pub interval: Duration,
}

/// A field of a record, by its AWS name, and the format version that introduced it.
const FIELDS: [(&str, u8); 30] = [
    ("version", 2),
    ("account-id", 2),
    ("interface-id", 2),
    ("srcaddr", 2),
    ("dstaddr", 2),
    ("srcport", 2),
    ("dstport", 2),
    ("protocol", 2),
    ("packets", 2),
    ("bytes", 2),
    ("start", 2),
    ("end", 2),
    ("action", 2),
    ("log-status", 2),
    ("vpc-id", 3),
    ("subnet-id", 3),
    ("instance-id", 3),
    ("tcp-flags", 3),
    ("type", 3),
    ("pkt-srcaddr", 3),
    ("pkt-dstaddr", 3),
    ("region", 4),
    ("az-id", 4),
    ("sublocation-type", 4),
    ("sublocation-id", 4),
    ("pkt-src-aws-service", 5),
    ("pkt-dst-aws-service", 5),
    ("flow-direction", 5),
    ("traffic-path", 5),
    ("reject-reason", 8),
];

/// sg's own fields (they do not change the version).
const SG_FIELDS: [&str; 3] = ["sg-group-id", "sg-rule-id", "sg-reason"];

/// AWS's default format (version 2).
pub const DEFAULT_FORMAT: &str = "${version} ${account-id} ${interface-id} ${srcaddr} ${dstaddr} ${srcport} ${dstport} ${protocol} ${packets} ${bytes} ${start} ${end} ${action} ${log-status}";

/// A record format: the fields in order, and the version a record of it declares (the
/// highest version among its fields, as AWS does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Format {
    fields: Vec<String>,
    version: u8,
}

impl Default for Format {
    fn default() -> Self {
        Format::parse(DEFAULT_FORMAT).expect("the default format parses")
    }
}

impl Format {
    /// Parses AWS's `${field} ${field} …` syntax; an unknown field is an error that
    /// names it.
    pub fn parse(text: &str) -> Result<Format, String> {
        let mut fields = Vec::new();
        let mut version = 2;
        for token in text.split_whitespace() {
            let Some(name) = token.strip_prefix("${").and_then(|t| t.strip_suffix('}')) else {
                return Err(format!(
                    "{token:?}: each field is written ${{name}}, separated by spaces"
                ));
            };
            if let Some((_, v)) = FIELDS.iter().find(|(f, _)| *f == name) {
                version = version.max(*v);
            } else if !SG_FIELDS.contains(&name) {
                return Err(format!(
                    "unknown field ${{{name}}}; known: {}, {}",
                    FIELDS.map(|(f, _)| f).join(", "),
                    SG_FIELDS.join(", ")
                ));
            }
            fields.push(name.to_string());
        }
        if fields.is_empty() {
            return Err("the format names no field".into());
        }
        Ok(Format { fields, version })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Accept,
    Reject,
}

/// One flow log record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub interface_id: String,
    pub account_id: Option<String>,
    /// None for a `SKIPDATA` record.
    pub flow: Option<RecordFlow>,
    pub packets: u64,
    pub bytes: u64,
    /// Unix seconds.
    pub start: u64,
    pub end: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordFlow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub action: Action,
    pub direction: Direction,
    pub tcp_flags: u8,
    pub group_id: Option<String>,
    pub rule_id: Option<String>,
    /// Why it was rejected (`audit` when audit mode passed it).
    pub reason: Option<String>,
}

impl Record {
    pub fn render(&self, format: &Format) -> String {
        let dash = || "-".to_string();
        let f = self.flow.as_ref();
        let fields: Vec<String> = format
            .fields
            .iter()
            .map(|name| match name.as_str() {
                "version" => format.version.to_string(),
                "account-id" => self.account_id.clone().unwrap_or_else(dash),
                "interface-id" => self.interface_id.clone(),
                "srcaddr" | "pkt-srcaddr" => f.map_or_else(dash, |f| f.src.to_string()),
                "dstaddr" | "pkt-dstaddr" => f.map_or_else(dash, |f| f.dst.to_string()),
                "srcport" => f.map_or_else(dash, |f| f.src_port.to_string()),
                "dstport" => f.map_or_else(dash, |f| f.dst_port.to_string()),
                "protocol" => f.map_or_else(dash, |f| f.protocol.to_string()),
                "packets" => f.map_or_else(dash, |_| self.packets.to_string()),
                "bytes" => f.map_or_else(dash, |_| self.bytes.to_string()),
                "start" => self.start.to_string(),
                "end" => self.end.to_string(),
                "action" => f.map_or_else(dash, |f| {
                    match f.action {
                        Action::Accept => "ACCEPT",
                        Action::Reject => "REJECT",
                    }
                    .to_string()
                }),
                "log-status" => if f.is_some() { "OK" } else { "SKIPDATA" }.to_string(),
                "tcp-flags" => f.map_or_else(dash, |f| f.tcp_flags.to_string()),
                "type" => f.map_or_else(dash, |f| {
                    if f.src.is_ipv4() { "IPv4" } else { "IPv6" }.to_string()
                }),
                "flow-direction" => f.map_or_else(dash, |f| f.direction.to_string()),
                "sg-group-id" => f.and_then(|f| f.group_id.clone()).unwrap_or_else(dash),
                "sg-rule-id" => f.and_then(|f| f.rule_id.clone()).unwrap_or_else(dash),
                "sg-reason" => f.and_then(|f| f.reason.clone()).unwrap_or_else(dash),
                // AWS fields with no meaning on a host (VPC, subnet, region, service…).
                _ => dash(),
            })
            .collect();
        fields.join(" ")
    }
}

/// A flow's endpoints as a record names them, from the enforced side's view: the source
/// is the remote for ingress and the local side for egress; protocols without ports
/// record 0 for both.
fn oriented(
    direction: Direction,
    protocol: u8,
    (local, local_port): (IpAddr, u16),
    (remote, remote_port): (IpAddr, u16),
) -> (IpAddr, IpAddr, u16, u16) {
    let (src, dst, sport, dport) = match direction {
        Direction::Ingress => (remote, local, remote_port, local_port),
        Direction::Egress => (local, remote, local_port, remote_port),
    };
    if matches!(protocol, sg_common::PROTO_TCP | sg_common::PROTO_UDP) {
        (src, dst, sport, dport)
    } else {
        (src, dst, 0, 0)
    }
}

/// Unix seconds of a boot-clock time, `now_boot` being the boot clock now.
fn unix_of(boot_ns: u64, now_boot: u64, now_unix: u64) -> u64 {
    now_unix.saturating_sub(now_boot.saturating_sub(boot_ns) / 1_000_000_000)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A rejected flow being aggregated: (ifindex, direction, src, dst, ports, protocol).
type RejectKey = (u32, u8, IpAddr, IpAddr, u16, u16, u8);

struct RejectAgg {
    packets: u64,
    bytes: u64,
    first_ns: u64,
    last_ns: u64,
    tcp_flags: u8,
    reason: String,
}

/// At most this many rejected flows are held per interval; more are counted as skipped.
const MAX_REJECT_FLOWS: usize = 100_000;

/// The flow log: aggregates, then writes one record per flow and direction per interval.
pub struct FlowLog {
    opts: Options,
    out: Box<dyn Write + Send>,
    pub next_flush: Instant,
    interval_start: u64,
    rejects: HashMap<RejectKey, RejectAgg>,
    /// Rejected packets and bytes that did not fit `rejects`, by ifindex.
    overflow: BTreeMap<u32, (u64, u64)>,
    /// Per flow, the counters already logged: (packets, bytes) by direction.
    logged: HashMap<CtKey, ([u64; 2], [u64; 2])>,
    /// Accepted traffic of flows deleted since the last flush (expired).
    gone: Vec<FlowRow>,
    /// Per counter slot, the skipped-event counters already reported.
    skipped_seen: BTreeMap<u32, (u64, u64)>,
    /// Records written since start.
    pub written: u64,
    /// Packets reported as SKIPDATA since start.
    pub skipped_packets: u64,
}

fn open(path: &std::path::Path) -> std::io::Result<Box<dyn Write + Send>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(std::io::stdout()));
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    Ok(Box::new(std::io::LineWriter::new(f)))
}

impl FlowLog {
    pub fn open(opts: Options) -> std::io::Result<FlowLog> {
        let out = open(&opts.path)?;
        Ok(FlowLog {
            next_flush: Instant::now() + opts.interval,
            interval_start: unix_now(),
            opts,
            out,
            rejects: HashMap::new(),
            overflow: BTreeMap::new(),
            logged: HashMap::new(),
            gone: Vec::new(),
            skipped_seen: BTreeMap::new(),
            written: 0,
            skipped_packets: 0,
        })
    }

    /// SIGHUP: the file is reopened (after logrotate moved it).
    pub fn reopen(&mut self) {
        match open(&self.opts.path) {
            Ok(out) => {
                self.out = out;
                log::info!("flow log {} reopened", self.opts.path.display());
            }
            Err(e) => log::error!(
                "flow log {}: reopening: {e}; still writing to the old file",
                self.opts.path.display()
            ),
        }
    }

    /// Takes a denial (or audited denial) event into its flow's aggregate.
    pub fn on_event(&mut self, e: &Event) {
        if e.admitted {
            return; // Accepted traffic is counted by conntrack.
        }
        let (src, dst, sport, dport) = oriented(
            e.direction,
            e.protocol,
            (e.local, e.local_port),
            (e.remote, e.remote_port),
        );
        let dir = match e.direction {
            Direction::Ingress => DIR_INGRESS,
            Direction::Egress => DIR_EGRESS,
        };
        let key = (e.ifindex, dir, src, dst, sport, dport, e.protocol);
        if !self.rejects.contains_key(&key) && self.rejects.len() >= MAX_REJECT_FLOWS {
            let o = self.overflow.entry(e.ifindex).or_default();
            o.0 += 1;
            o.1 += e.bytes as u64;
            return;
        }
        let reason = if e.audited {
            "audit".to_string()
        } else {
            crate::events::reason_name(e.reason).to_string()
        };
        let agg = self.rejects.entry(key).or_insert(RejectAgg {
            packets: 0,
            bytes: 0,
            first_ns: e.time_ns,
            last_ns: e.time_ns,
            tcp_flags: 0,
            reason,
        });
        agg.packets += 1;
        agg.bytes += e.bytes as u64;
        agg.first_ns = agg.first_ns.min(e.time_ns);
        agg.last_ns = agg.last_ns.max(e.time_ns);
        agg.tcp_flags |= e.tcp_flags;
    }

    /// Flows the agent is about to delete (expired): their last traffic is logged at the
    /// next flush.
    pub fn absorb_gone(&mut self, rows: &[FlowRow]) {
        self.gone.extend_from_slice(rows);
    }

    /// Writes the records of the interval that ends now. `flows` is the conntrack table,
    /// `counters` each enforced interface's counters by ifindex, `clock_offset` the
    /// datapath's clock offset (tests move it).
    pub fn flush(
        &mut self,
        flows: &[FlowRow],
        counters: &BTreeMap<u32, Counters>,
        labels: &Labels,
        clock_offset: u64,
    ) {
        let now_unix = unix_now();
        let now_boot = crate::sys::boot_ns() + clock_offset;
        let start = self.interval_start;
        let mut records = Vec::new();
        let interface = |ifindex: u32| labels.interfaces.get(&ifindex);
        // Accepted: what each flow carried since it was last logged, per direction.
        let mut present = HashMap::with_capacity(flows.len());
        let gone = std::mem::take(&mut self.gone);
        for (key, entry, _) in flows.iter().chain(gone.iter()) {
            let before = self.logged.get(key).copied().unwrap_or_default();
            let Some(iface) = interface(key.ifindex) else {
                continue;
            };
            let rule = labels.rules.get(&entry.rule_id);
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                let d = dir as usize;
                let packets = entry.packets[d].saturating_sub(before.0[d]);
                if packets == 0 {
                    continue;
                }
                let direction = crate::datapath::direction_of(dir);
                let (src, dst, sport, dport) = oriented(
                    direction,
                    key.protocol,
                    (
                        addr_of(key.family, &key.local),
                        u16::from_be_bytes(key.local_port),
                    ),
                    (
                        addr_of(key.family, &key.remote),
                        u16::from_be_bytes(key.remote_port),
                    ),
                );
                records.push(Record {
                    interface_id: iface.eni.clone(),
                    account_id: iface.owner_id.clone(),
                    flow: Some(RecordFlow {
                        src,
                        dst,
                        src_port: sport,
                        dst_port: dport,
                        protocol: key.protocol,
                        action: Action::Accept,
                        direction,
                        tcp_flags: 0,
                        group_id: rule.map(|r| r.1.clone()),
                        rule_id: rule.map(|r| r.0.clone()),
                        reason: None,
                    }),
                    packets,
                    bytes: entry.bytes[d].saturating_sub(before.1[d]),
                    start: unix_of(entry.created_ns, now_boot, now_unix).max(start),
                    end: unix_of(entry.last_seen_ns, now_boot, now_unix).clamp(start, now_unix),
                });
            }
            present.insert(*key, (entry.packets, entry.bytes));
        }
        for g in &gone {
            present.remove(&g.0);
        }
        self.logged = present;
        // Rejected: the interval's aggregates.
        for ((ifindex, dir, src, dst, sport, dport, protocol), agg) in self.rejects.drain() {
            let Some(iface) = interface(ifindex) else {
                continue;
            };
            records.push(Record {
                interface_id: iface.eni.clone(),
                account_id: iface.owner_id.clone(),
                flow: Some(RecordFlow {
                    src,
                    dst,
                    src_port: sport,
                    dst_port: dport,
                    protocol,
                    action: Action::Reject,
                    direction: crate::datapath::direction_of(dir),
                    tcp_flags: agg.tcp_flags,
                    group_id: None,
                    rule_id: None,
                    reason: Some(agg.reason),
                }),
                packets: agg.packets,
                bytes: agg.bytes,
                start: unix_of(agg.first_ns, now_boot, now_unix).max(start),
                end: unix_of(agg.last_ns, now_boot, now_unix).clamp(start, now_unix),
            });
        }
        // Skipped: events the kernel could not report, and rejects beyond the cap.
        let overflow = std::mem::take(&mut self.overflow);
        for (ifindex, iface) in &labels.interfaces {
            let Some(c) = counters.get(ifindex) else {
                continue;
            };
            let (mut packets, mut bytes) = (0, 0);
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                for slot in [counter::EVENTS_SUPPRESSED, counter::EVENTS_LOST] {
                    let at = Counters::index(dir, slot);
                    packets += c.v[at];
                    bytes += c.bytes[at];
                }
            }
            let seen = self.skipped_seen.insert(*ifindex, (packets, bytes));
            let (seen_p, seen_b) = seen.unwrap_or((packets, bytes));
            let (mut dp, mut db) = (packets.saturating_sub(seen_p), bytes.saturating_sub(seen_b));
            if let Some((p, b)) = overflow.get(ifindex) {
                dp += p;
                db += b;
            }
            if dp > 0 {
                self.skipped_packets += dp;
                records.push(Record {
                    interface_id: iface.eni.clone(),
                    account_id: iface.owner_id.clone(),
                    flow: None,
                    packets: dp,
                    bytes: db,
                    start,
                    end: now_unix,
                });
            }
        }
        records.sort_by(|a, b| (a.start, &a.interface_id).cmp(&(b.start, &b.interface_id)));
        let mut text = String::new();
        for r in &records {
            text += &r.render(&self.opts.format);
            text.push('\n');
        }
        if let Err(e) = self
            .out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
        {
            log::error!("flow log {}: {e}", self.opts.path.display());
        } else {
            self.written += records.len() as u64;
        }
        self.interval_start = now_unix;
        self.next_flush = Instant::now() + self.opts.interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            interface_id: "eni-1".into(),
            account_id: Some("123456789012".into()),
            flow: Some(RecordFlow {
                src: "198.18.1.11".parse().unwrap(),
                dst: "198.18.2.21".parse().unwrap(),
                src_port: 40000,
                dst_port: 3306,
                protocol: 6,
                action: Action::Accept,
                direction: Direction::Ingress,
                tcp_flags: 2,
                group_id: Some("sg-db".into()),
                rule_id: Some("sgr-0123456789abcdef0".into()),
                reason: None,
            }),
            packets: 10,
            bytes: 840,
            start: 1_700_000_000,
            end: 1_700_000_059,
        }
    }

    #[test]
    fn the_default_format_is_aws_version_2() {
        assert_eq!(
            record().render(&Format::default()),
            "2 123456789012 eni-1 198.18.1.11 198.18.2.21 40000 3306 6 10 840 1700000000 1700000059 ACCEPT OK"
        );
        let skip = Record {
            flow: None,
            account_id: None,
            ..record()
        };
        assert_eq!(
            skip.render(&Format::default()),
            "2 - eni-1 - - - - - - - 1700000000 1700000059 - SKIPDATA"
        );
    }

    #[test]
    fn custom_formats_take_aws_and_sg_fields() {
        let f = Format::parse("${version} ${interface-id} ${flow-direction} ${tcp-flags} ${type} ${vpc-id} ${sg-group-id} ${sg-rule-id} ${sg-reason} ${action}").unwrap();
        assert_eq!(
            record().render(&f),
            "5 eni-1 ingress 2 IPv4 - sg-db sgr-0123456789abcdef0 - ACCEPT"
        );
        assert!(Format::parse("${version} ${nope}")
            .unwrap_err()
            .contains("unknown field ${nope}"));
        assert!(Format::parse("version").is_err());
        assert!(Format::parse("  ").is_err());
    }
}
