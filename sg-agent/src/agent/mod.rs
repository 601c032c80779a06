//! The running agent: adopt what is pinned, compile the state for the local interfaces,
//! apply the ordered difference, attach, then keep the maps equal to the state as the file,
//! the interfaces and time change.
//!
//! One loop with an arm per source of work: state changes (inotify, `watch`), SIGHUP,
//! SIGINT/SIGTERM, and housekeeping (hot plug and the polling fallback, conntrack GC),
//! which runs on its own deadlines however busy the other arms are. Rooms: `reconcile`
//! (bind, apply, the membership path), `watch` (signals, inotify, file identity),
//! `persist` (plan metadata, adoption, the run directory).

#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    compile::{Plan, PlanIndex},
    datapath::{Datapath, DatapathError, IngressHook, MapSizes},
    model::State,
    source::{self, Document, FileSource, LoadedState},
    status,
    sys::{self, HostInterface},
};

mod etcd;
mod persist;
mod reconcile;
mod ring;
mod watch;

pub use etcd::EtcdOptions;

/// The first state an agent starts from.
enum First {
    File(Document, State),
    Etcd {
        revision: i64,
        sha: String,
        kvs: BTreeMap<String, String>,
        state: State,
    },
    /// etcd did not answer: the pinned state is enforced meanwhile.
    Unreachable(String),
}

pub use persist::{default_run_dir, holder, load_known, pinned_plan, run_dir_of};
pub use reconcile::{bind, Orphan};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    State(#[from] source::StateError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("{} is held by a running sg-agent (pid {}); stop it first", pin_dir.display(), pid.map_or("unknown".to_string(), |p| p.to_string()))]
    Owned { pin_dir: PathBuf, pid: Option<u32> },
    #[error("--attach {iface}={eni}: {reason}; nothing was attached")]
    Attach {
        iface: String,
        eni: String,
        reason: String,
    },
    #[error("{iface} is a bond: XDP there sees its slaves' ifindexes and would enforce nothing; run with --ingress-hook tc")]
    XdpOnBond { iface: String },
    #[error("etcd {0}")]
    Etcd(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub state: PathBuf,
    /// Explicit bindings: interface name → network interface id.
    pub attach: Vec<(String, String)>,
    pub pin_dir: PathBuf,
    pub run_dir: PathBuf,
    pub hook: IngressHook,
    pub default_deny: bool,
    pub revalidate: bool,
    /// Audit mode on every interface (SPEC §7).
    pub audit: bool,
    pub flow_log: Option<crate::flowlog::Options>,
    /// Follow etcd instead of the state file (`opts.state` then only names it).
    pub etcd: Option<EtcdOptions>,
    pub api: Option<SocketAddr>,
    pub sizes: MapSizes,
    /// Period of hot-plug detection and the polling fallback.
    pub tick: Duration,
    pub gc_interval: Duration,
}

enum Event {
    StateChanged,
    Reload,
    Stop,
    Etcd(etcd::EtcdEvent),
}

pub struct Agent {
    opts: RunOptions,
    /// One agent per pin directory (SPEC §6).
    _lock: persist::OwnerLock,
    source: FileSource,
    dp: Datapath,
    plan: Plan,
    /// Ruleset by content and users, for membership changes; follows `plan`.
    index: PlanIndex,
    state: Option<LoadedState>,
    /// The applied state's file content, with its interfaces located; follows `state`.
    /// None forces the next change through a full parse and compile.
    doc: Option<Document>,
    last_error: Option<String>,
    host: Vec<HostInterface>,
    attached: BTreeSet<u32>,
    names: BTreeMap<u32, String>,
    status: Arc<Mutex<String>>,
    /// Identity of the state file content last read.
    seen: Option<watch::FileIdentity>,
    next_tick: Instant,
    next_gc: Instant,
    /// The last valid definitions of the locally enforced interfaces, with the groups and
    /// prefix lists they use: what an orphaned interface keeps enforcing.
    known: State,
    /// Enforced interfaces that the current state no longer binds, by ifindex.
    orphans: BTreeMap<u32, reconcile::Orphan>,
    /// Times something removed programs, links or pins, and when it last happened.
    enforcement_lost: u64,
    last_lost: Option<std::time::SystemTime>,
    /// What flow events' numbers mean, shared with the event reader.
    labels: Arc<Mutex<crate::events::Labels>>,
    flow_log: Option<Arc<Mutex<crate::flowlog::FlowLog>>>,
    /// The event ring's reader (drained before each flow log flush).
    reader: Option<Arc<Mutex<ring::Reader>>>,
    /// Counts for the metrics (SPEC §7).
    stats: status::AgentStats,
    /// systemd's readiness and status protocol.
    notifier: crate::notify::Notifier,
    /// What the agent knows of etcd, when it follows etcd.
    etcd_view: Option<etcd::EtcdView>,
    /// Signals caught since the first state was read, for the loop to take (`run`).
    signals: Option<watch::Signals>,
}

impl Agent {
    /// Validates the state, then adopts or creates the pins and enforces the state.
    /// Nothing is attached when the state is invalid.
    pub fn start(opts: RunOptions) -> Result<Agent, AgentError> {
        // The first state: the file's, or etcd's at one revision.
        let mut seen = None;
        let first = match &opts.etcd {
            None => {
                // The file's identity is taken before it is read: a change written while
                // the agent starts then differs from it, and the watcher's first wake-up
                // applies it.
                watch::wait_until_written(&opts.state)?;
                seen = watch::identity(&opts.state);
                let (doc, state) = Document::load(&opts.state)?;
                First::File(doc, state)
            }
            Some(e) => match e.client.list(&e.prefix, 1000) {
                Ok((revision, kvs)) => {
                    let kvs: BTreeMap<String, String> =
                        kvs.into_iter().map(|(k, kv)| (k, kv.value)).collect();
                    let doc = source::etcd::document(&e.prefix, &kvs)
                        .map_err(|m| AgentError::Etcd(format!("{}: {m}", e.prefix)))?;
                    let state = source::parse_str(&doc).map_err(|problems| {
                        AgentError::State(source::StateError {
                            file: PathBuf::from(format!(
                                "etcd {} at revision {revision}",
                                e.prefix
                            )),
                            problems,
                        })
                    })?;
                    if state.security_groups.is_empty() && state.network_interfaces.is_empty() {
                        return Err(AgentError::Etcd(format!(
                            "{} at revision {revision} holds no state (an empty state is invalid); nothing was attached",
                            e.prefix
                        )));
                    }
                    First::Etcd {
                        revision,
                        sha: source::etcd::Digest::of(&e.prefix, &kvs).hex(),
                        kvs,
                        state,
                    }
                }
                Err(err) => First::Unreachable(err.to_string()),
            },
        };
        match &first {
            First::File(_, state) | First::Etcd { state, .. } => check_attach(&opts.attach, state)?,
            First::Unreachable(_) => {}
        }
        // From here a stop waits for the loop: the start runs to its end first.
        let signals = watch::catch_signals()?;
        std::fs::create_dir_all(&opts.run_dir)
            .map_err(io(format!("creating {}", opts.run_dir.display())))?;
        let lock = persist::lock(&opts.run_dir, &opts.pin_dir)?;
        sys::ensure_pin_dir(&opts.pin_dir).map_err(io(format!(
            "preparing pin directory {}",
            opts.pin_dir.display()
        )))?;
        let mut dp = Datapath::open_pinned(&opts.sizes, &opts.pin_dir)?;
        let plan = persist::adopt(&mut dp, &opts.run_dir)?;
        if !plan.prefixes.is_empty() || !plan.interfaces.is_empty() {
            log::info!(
                "adopted pinned state: {} interfaces, {} prefixes, {} rulesets",
                plan.interfaces.len(),
                plan.prefixes.len(),
                plan.rulesets.len()
            );
        }
        let now = Instant::now();
        let known = persist::load_known(&opts.run_dir);
        let flow_log = match &opts.flow_log {
            Some(f) => Some(Arc::new(Mutex::new(
                crate::flowlog::FlowLog::open(f.clone())
                    .map_err(io(format!("opening flow log {}", f.path.display())))?,
            ))),
            None => None,
        };
        let mut agent = Agent {
            labels: Arc::new(Mutex::new(crate::events::Labels::default())),
            flow_log,
            reader: None,
            stats: status::AgentStats::default(),
            notifier: crate::notify::Notifier::from_env(),
            etcd_view: None,
            signals: Some(signals),
            _lock: lock,
            known,
            orphans: BTreeMap::new(),
            enforcement_lost: 0,
            last_lost: None,
            source: FileSource::new(&opts.state),
            next_tick: now + opts.tick,
            next_gc: now + opts.gc_interval,
            opts,
            dp,
            index: PlanIndex::new(&plan),
            plan,
            state: None,
            doc: None,
            last_error: None,
            host: vec![],
            attached: BTreeSet::new(),
            names: BTreeMap::new(),
            status: Arc::new(Mutex::new(String::new())),
            seen: None,
        };
        agent.seen = seen;
        // The monitor socket opens before the first status says "applied".
        let reader = ring::Reader::open(
            &agent.opts.pin_dir,
            &agent.opts.run_dir,
            agent.labels.clone(),
            agent.flow_log.clone(),
        )
        .map_err(io("reading the flow event ring"))?;
        let reader = Arc::new(Mutex::new(reader));
        ring::spawn_reader(reader.clone());
        agent.reader = Some(reader);
        match first {
            First::File(doc, state) => agent.apply(state, reconcile::Content::Document(doc))?,
            First::Etcd {
                revision,
                sha,
                kvs,
                state,
            } => {
                let digest = source::etcd::Digest::of(
                    agent.opts.etcd.as_ref().map_or("", |o| o.prefix.as_str()),
                    &kvs,
                );
                agent.apply(state, reconcile::Content::Sha(sha))?;
                agent.etcd_view = Some(etcd::EtcdView {
                    kvs,
                    digest,
                    revision,
                    applied_revision: revision,
                    connected: true,
                    since: None,
                });
                agent.write_status();
            }
            First::Unreachable(e) => {
                // A restarted agent enforces what is pinned at once, and catches up.
                if agent.plan.interfaces.is_empty() {
                    return Err(AgentError::Etcd(format!(
                        "unreachable ({e}) and nothing is pinned to enforce meanwhile; nothing was attached"
                    )));
                }
                log::warn!("etcd unreachable ({e}); enforcing the pinned state until it answers");
                agent.etcd_view = Some(etcd::EtcdView {
                    since: Some(std::time::SystemTime::now()),
                    ..etcd::EtcdView::default()
                });
                agent.write_status();
            }
        }
        // Last: its grace period must not delay anything the status promises.
        agent.refresh_seen();
        Ok(agent)
    }

    /// Runs until SIGINT or SIGTERM; enforcement stays in place afterwards.
    pub fn run(mut self) -> Result<(), AgentError> {
        let (tx, rx) = mpsc::channel();
        if let Some(signals) = self.signals.take() {
            watch::spawn_signals(signals, tx.clone());
        }
        match &self.opts.etcd {
            None => watch::spawn_watcher(&self.opts.state, tx),
            Some(e) => {
                let resume = self
                    .etcd_view
                    .as_ref()
                    .filter(|v| v.revision > 0)
                    .map(|v| v.revision);
                etcd::spawn(e.clone(), resume, tx);
            }
        }
        if let Some(addr) = self.opts.api {
            crate::api::serve(
                addr,
                self.status.clone(),
                self.labels.clone(),
                self.opts.pin_dir.clone(),
            )
            .map_err(io(format!("serving the API on {addr}")))?;
        }
        // The first policy is enforced (start applied it): systemd may go on.
        self.notifier.ready(&self.status_line());
        loop {
            let mut deadline = self.next_tick.min(self.next_gc);
            if let Some(due) = self.notifier.watchdog(Instant::now()) {
                deadline = deadline.min(due);
            }
            if let Some(f) = &self.flow_log {
                deadline = deadline.min(f.lock().unwrap_or_else(|p| p.into_inner()).next_flush);
            }
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Event::Stop) => {
                    self.notifier.stopping();
                    // Every open interval is flushed (SPEC §7).
                    self.flush_flow_log();
                    log::info!("stopping; programs stay attached and maps pinned");
                    return Ok(());
                }
                Ok(Event::Reload) => {
                    log::info!("SIGHUP: re-reading {}", self.opts.state.display());
                    self.notifier.reloading();
                    if let Some(f) = &self.flow_log {
                        f.lock().unwrap_or_else(|p| p.into_inner()).reopen();
                    }
                    if self.opts.etcd.is_none() {
                        self.reload(true);
                    }
                    self.notifier.reloaded(&self.status_line());
                }
                Ok(Event::StateChanged) => self.reload(false),
                Ok(Event::Etcd(e)) => self.on_etcd(e),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
            self.housekeeping();
        }
    }

    /// Work that runs on its own deadlines, whatever else keeps the loop busy.
    fn housekeeping(&mut self) {
        let now = Instant::now();
        if now >= self.next_tick {
            self.next_tick = now + self.opts.tick;
            self.check_enforcement();
            self.hot_plug();
            if !self.dp.seen_is_on() {
                // An attach switched the presence filter off.
                self.refresh_seen();
            }
            if self.opts.etcd.is_none() {
                // Polling fallback for file changes inotify could not see.
                self.reload(false);
            }
        }
        if now >= self.next_gc {
            self.next_gc = now + self.opts.gc_interval;
            match crate::conntrack::gc(&mut self.dp, &self.plan) {
                Ok(gone) if gone.is_empty() => {}
                Ok(gone) => {
                    log::debug!("conntrack GC removed {} expired flows", gone.len());
                    if let Some(f) = &self.flow_log {
                        f.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .absorb_gone(&gone);
                    }
                }
                Err(e) => log::warn!("conntrack GC: {e}"),
            }
            self.refresh_seen();
        }
        let due = self
            .flow_log
            .as_ref()
            .is_some_and(|f| f.lock().unwrap_or_else(|p| p.into_inner()).next_flush <= now);
        if due {
            self.flush_flow_log();
        }
    }

    /// Stamps every flow into the presence filter and moves its epoch on; a filter that
    /// could not be refreshed stays as it was (off, or trusted with fresh stamps).
    fn refresh_seen(&mut self) {
        match self.dp.refresh_seen() {
            Ok(n) => log::debug!("presence filter refreshed over {n} flows"),
            Err(e) => log::warn!("refreshing the flow-presence filter: {e}"),
        }
    }

    /// Writes the flow log records of the interval that ends now.
    fn flush_flow_log(&mut self) {
        let Some(f) = self.flow_log.clone() else {
            return;
        };
        if let Some(r) = &self.reader {
            r.lock().unwrap_or_else(|p| p.into_inner()).drain();
        }
        let tables = self.dp.tables();
        let flows = match tables.flows() {
            Ok(f) => f,
            Err(e) => {
                log::warn!("flow log: reading conntrack: {e}");
                Vec::new()
            }
        };
        let counters: BTreeMap<u32, sg_common::Counters> = tables
            .interfaces()
            .unwrap_or_default()
            .into_iter()
            .map(|(i, (_, c))| (i, c))
            .collect();
        let offset = self.dp.global().map(|g| g.clock_offset_ns).unwrap_or(0);
        let labels = self
            .labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
        f.flush(&flows, &counters, &labels, offset);
        self.stats.flow_log_records = f.written;
        self.stats.flow_log_skipped_packets = f.skipped_packets;
        drop(f);
        self.write_status();
    }

    fn fail(&mut self, error: String) {
        self.stats.apply_failures += 1;
        if self.last_error.as_deref() != Some(error.as_str()) {
            log::error!("keeping the last valid state: {error}");
        }
        self.last_error = Some(error);
        self.write_status();
    }

    fn write_status(&mut self) {
        let orphans: BTreeMap<u32, status::OrphanView> = self
            .orphans
            .iter()
            .map(|(ifindex, o)| {
                let view = status::OrphanView {
                    name: o.name.clone(),
                    network_interface: o.interface.id.clone(),
                    groups: o.interface.groups.clone(),
                    since: o.since,
                };
                (*ifindex, view)
            })
            .collect();
        let doc = status::agent_document(&status::AgentView {
            state_path: &self.opts.state,
            run_dir: &self.opts.run_dir,
            applied: self.state.as_ref(),
            last_error: self.last_error.as_deref(),
            hook: self.opts.hook,
            default_deny: self.opts.default_deny,
            revalidate: self.opts.revalidate,
            plan: &self.plan,
            names: &self.names,
            orphans: &orphans,
            enforcement_lost: self.enforcement_lost,
            last_lost: self.last_lost,
            audit: self.opts.audit,
            stats: &self.stats,
            source: self.source_json(),
        });
        if let Err(e) = self.dp.write_status(&doc) {
            log::warn!("writing status: {e}");
        }
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = doc;
        self.notifier.status(&self.status_line());
    }

    /// Where the state comes from, for status (SPEC §5).
    fn source_json(&self) -> serde_json::Value {
        match (&self.opts.etcd, &self.etcd_view) {
            (Some(e), Some(v)) => serde_json::json!({
                "kind": "etcd",
                "endpoints": e.client.endpoints(),
                "prefix": e.prefix,
                "connected": v.connected,
                "disconnected_since_unix": v.since.map(|t| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)),
                "disconnected_seconds": v.since.map(|t| t.elapsed().map(|d| d.as_secs()).unwrap_or(0)),
                "revision": v.revision,
                "applied_revision": v.applied_revision,
            }),
            (Some(e), None) => serde_json::json!({
                "kind": "etcd",
                "endpoints": e.client.endpoints(),
                "prefix": e.prefix,
                "connected": false,
            }),
            _ => serde_json::json!({ "kind": "file", "path": self.opts.state }),
        }
    }

    /// One line for systemd's `STATUS=`: the applied state, the interfaces, the last error.
    fn status_line(&self) -> String {
        let names: Vec<String> = self
            .plan
            .interfaces
            .iter()
            .map(|(i, p)| {
                format!(
                    "{} ({})",
                    self.names.get(i).map_or("?", |n| n.as_str()),
                    p.eni
                )
            })
            .collect();
        format!(
            "state {} applied; enforcing {} interface(s){}{}{}",
            self.state.as_ref().map_or("-", |s| &s.sha256[..12]),
            names.len(),
            if names.is_empty() {
                String::new()
            } else {
                format!(": {}", names.join(", "))
            },
            if self.orphans.is_empty() {
                String::new()
            } else {
                format!("; {} orphaned", self.orphans.len())
            },
            self.last_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        )
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

/// `--attach IFACE=ENI` must name an interface of this host and a network interface of
/// the state (SPEC §4): a typo is an error at start, before anything is attached.
fn check_attach(attach: &[(String, String)], state: &State) -> Result<(), AgentError> {
    if attach.is_empty() {
        return Ok(());
    }
    let host = sys::interfaces().map_err(io("listing interfaces"))?;
    for (iface, eni) in attach {
        let reason = if !host.iter().any(|h| &h.name == iface) {
            Some(format!("no interface {iface} on this host"))
        } else if state.interface(eni).is_none() {
            Some(format!("no network interface {eni} in the state"))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(AgentError::Attach {
                iface: iface.clone(),
                eni: eni.clone(),
                reason,
            });
        }
    }
    Ok(())
}
