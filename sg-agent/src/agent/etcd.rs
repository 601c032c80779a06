//! Following etcd (SPEC §8): a thread lists the prefix at one revision, then watches from
//! the next one and forwards each watch response as one step; a compaction leads to a
//! fresh list (deletions seen); an outage to reconnection with full-jitter backoff
//! (capped at 30 s) that resumes from the last revision. The agent's loop applies what
//! it forwards: the combined state, validated like a file, or the last valid one kept.

#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use super::{Agent, Event};
use crate::source::{
    self,
    etcd::{Changes, Client, Digest, EtcdError, InterfaceDelta},
};

/// Where the agent follows etcd.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    pub client: Client,
    pub prefix: String,
}

/// What the etcd thread tells the loop.
pub(super) enum EtcdEvent {
    /// A whole list, at `revision`.
    Snapshot {
        revision: i64,
        kvs: BTreeMap<String, String>,
    },
    /// One watch response.
    Changes(Changes),
    /// etcd answers again (the watch resumes from the last revision).
    Connected,
    Disconnected(String),
}

/// What the agent knows of etcd.
#[derive(Debug, Default)]
pub(super) struct EtcdView {
    pub kvs: BTreeMap<String, String>,
    /// The revision `kvs` is at, and the one whose state is applied.
    pub revision: i64,
    pub applied_revision: i64,
    /// What identifies `kvs`' content (the applied state's "sha256").
    pub digest: Digest,
    pub connected: bool,
    pub since: Option<SystemTime>,
}

/// A full-jitter backoff: a random wait in [0, min(cap, base·2ⁿ)].
struct Backoff {
    failures: u32,
    seed: u64,
}

impl Backoff {
    fn new() -> Backoff {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Backoff { failures: 0, seed }
    }

    fn next(&mut self) -> Duration {
        // xorshift64*: enough randomness to spread a fleet's reconnections.
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        let r = self.seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let ceiling = (200u64 << self.failures.min(8)).min(30_000);
        self.failures += 1;
        Duration::from_millis(r % (ceiling + 1))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Starts the thread; `resume` is the revision already applied (None: list first).
pub(super) fn spawn(opts: EtcdOptions, resume: Option<i64>, tx: mpsc::Sender<Event>) {
    std::thread::spawn(move || {
        let send = |e: EtcdEvent| tx.send(Event::Etcd(e)).is_ok();
        let mut revision = resume;
        let mut backoff = Backoff::new();
        let mut connected = resume.is_some();
        loop {
            let from = match revision {
                Some(r) => {
                    if !connected {
                        // Resuming: make sure etcd answers before saying so.
                        if let Err(e) = opts.client.list(&format!("{}\u{0}", opts.prefix), 1) {
                            if !send(EtcdEvent::Disconnected(e.to_string())) {
                                return;
                            }
                            std::thread::sleep(backoff.next());
                            continue;
                        }
                        connected = true;
                        backoff.reset();
                        if !send(EtcdEvent::Connected) {
                            return;
                        }
                    }
                    r
                }
                None => match opts.client.list(&opts.prefix, 1000) {
                    Ok((r, kvs)) => {
                        connected = true;
                        backoff.reset();
                        let kvs = kvs.into_iter().map(|(k, kv)| (k, kv.value)).collect();
                        if !send(EtcdEvent::Snapshot { revision: r, kvs }) {
                            return;
                        }
                        revision = Some(r);
                        r
                    }
                    Err(e) => {
                        connected = false;
                        if !send(EtcdEvent::Disconnected(e.to_string())) {
                            return;
                        }
                        std::thread::sleep(backoff.next());
                        continue;
                    }
                },
            };
            let mut alive = true;
            let result = opts.client.watch(&opts.prefix, from + 1, |changes| {
                revision = Some(changes.revision);
                alive = send(EtcdEvent::Changes(changes));
                alive
            });
            if !alive {
                return;
            }
            match result {
                Ok(()) => return,
                Err(EtcdError::Compacted(at)) => {
                    log::warn!(
                        "etcd: revision {} was compacted (now {at}); listing {} again",
                        from + 1,
                        opts.prefix
                    );
                    revision = None;
                }
                Err(e) => {
                    connected = false;
                    if !send(EtcdEvent::Disconnected(e.to_string())) {
                        return;
                    }
                    std::thread::sleep(backoff.next());
                }
            }
        }
    });
}

impl Agent {
    /// Applies what the etcd thread forwarded.
    pub(super) fn on_etcd(&mut self, event: EtcdEvent) {
        let Some(view) = self.etcd_view.as_mut() else {
            return;
        };
        match event {
            EtcdEvent::Snapshot { revision, kvs } => {
                let prefix = self.opts.etcd.as_ref().map_or("", |o| o.prefix.as_str());
                view.digest = Digest::of(prefix, &kvs);
                view.kvs = kvs;
                view.revision = revision;
                self.etcd_connected();
                self.apply_etcd();
            }
            EtcdEvent::Changes(c) => {
                let started = Instant::now();
                let delta = self.interface_delta(&c);
                let Some(view) = self.etcd_view.as_mut() else {
                    return;
                };
                let prefix = self.opts.etcd.as_ref().map_or("", |o| o.prefix.as_str());
                for (k, v) in c.changes {
                    if let Some(old) = view.kvs.get(&k) {
                        view.digest.toggle(prefix, &k, old);
                    }
                    match v {
                        Some(v) => {
                            view.digest.toggle(prefix, &k, &v);
                            view.kvs.insert(k, v)
                        }
                        None => view.kvs.remove(&k),
                    };
                }
                view.revision = c.revision;
                let digest = view.digest.hex();
                match delta {
                    Some((delta, holders)) => {
                        let holders = |a: &IpAddr| holders.get(a).copied().unwrap_or(0);
                        if self.apply_interfaces(
                            delta.added,
                            delta.removed,
                            holders,
                            digest,
                            started,
                        ) {
                            self.etcd_applied(c.revision);
                        }
                    }
                    None => self.apply_etcd(),
                }
            }
            EtcdEvent::Connected => {
                self.etcd_connected();
                self.write_status();
            }
            EtcdEvent::Disconnected(e) => {
                if view.connected || view.since.is_none() {
                    log::warn!(
                        "etcd unreachable ({e}); enforcing the last valid state (revision {}) and reconnecting",
                        view.applied_revision
                    );
                    view.connected = false;
                    view.since = Some(SystemTime::now());
                    self.write_status();
                }
            }
        }
    }

    /// A watch response on the incremental path (network interfaces only, all valid):
    /// applied to the loaded state, with how many interfaces hold each changed address.
    /// None: the full path.
    fn interface_delta(&mut self, c: &Changes) -> Option<(InterfaceDelta, HashMap<IpAddr, usize>)> {
        // Orphans live in the compiled state but not in etcd: the full path keeps them.
        if !self.orphans.is_empty() {
            return None;
        }
        let (view, opts, loaded) = (
            self.etcd_view.as_ref()?,
            self.opts.etcd.as_ref()?,
            self.state.as_mut()?,
        );
        // The loaded state must be the view's: not after a failed or kept-back apply.
        if view.applied_revision != view.revision {
            return None;
        }
        let delta =
            source::etcd::apply_interfaces(&opts.prefix, &view.kvs, &mut loaded.state, &c.changes)?;
        let holders = delta.holders(&loaded.state);
        Some((delta, holders))
    }

    fn etcd_applied(&mut self, revision: i64) {
        if let Some(v) = self.etcd_view.as_mut() {
            v.applied_revision = revision;
        }
        self.write_status();
    }

    fn etcd_connected(&mut self) {
        if let Some(view) = self.etcd_view.as_mut() {
            if !view.connected {
                if view.since.is_some() {
                    log::info!(
                        "etcd answers again; resuming from revision {}",
                        view.revision
                    );
                }
                view.connected = true;
                view.since = None;
            }
        }
    }

    /// The combined state at the view's revision: validated like a file; applied, or
    /// the last valid one kept.
    fn apply_etcd(&mut self) {
        let (Some(view), Some(opts)) = (self.etcd_view.as_ref(), self.opts.etcd.as_ref()) else {
            return;
        };
        let revision = view.revision;
        let doc = match source::etcd::document(&opts.prefix, &view.kvs) {
            Ok(d) => d,
            Err(e) => {
                self.fail(format!("etcd {} at revision {revision}: {e}", opts.prefix));
                return;
            }
        };
        let state = match source::parse_str(&doc) {
            Ok(s) if s.security_groups.is_empty() && s.network_interfaces.is_empty() => {
                Err(format!(
                    "etcd {} at revision {revision} holds no state (an empty state is invalid)",
                    opts.prefix
                ))
            }
            Ok(s) => Ok(s),
            Err(problems) => Err(format!(
                "etcd {} at revision {revision}: {}",
                opts.prefix,
                problems
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
        };
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                self.fail(e);
                return;
            }
        };
        let sha = view.digest.hex();
        if self.state.as_ref().is_some_and(|s| s.sha256 == sha) {
            if let Some(v) = self.etcd_view.as_mut() {
                v.applied_revision = revision;
            }
            self.last_error = None;
            self.write_status();
            return;
        }
        match self.apply(state, super::reconcile::Content::Sha(sha)) {
            Ok(()) => {
                if let Some(v) = self.etcd_view.as_mut() {
                    v.applied_revision = revision;
                }
                self.write_status();
            }
            Err(e) => self.fail(format!("applying etcd revision {revision}: {e}")),
        }
    }
}
