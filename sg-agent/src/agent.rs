//! The running agent: adopt what is pinned, compile the state for the local interfaces,
//! apply the ordered difference, attach, then keep the maps equal to the state as the file,
//! the interfaces and time change. One loop over events: state changes (inotify, with a
//! polling fallback), SIGHUP, SIGINT/SIGTERM, and a tick for hot plug and conntrack GC.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use sg_common::{ct, CtKey, DIR_INGRESS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

use crate::{
    compile::{
        compile, diff, membership_change, port_entries, ChangedAddress, LocalInterface, Options,
        Plan, PlanIndex, RuleGrant, RuleInfo,
    },
    datapath::{self, addr_of, direction_of, Datapath, DatapathError, IngressHook, MapSizes},
    model::{NetworkInterface, State},
    source::{self, Document, LoadedState},
    system::{self, HostInterface},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    State(#[from] source::StateError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
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
    pub api: Option<SocketAddr>,
    pub sizes: MapSizes,
    pub tick: Duration,
    pub gc_interval: Duration,
}

/// The default run directory for a pin directory in this network namespace, so agents of
/// two namespaces (whose /sys/fs/bpf differ) never share one.
pub fn default_run_dir(pin_dir: &Path) -> PathBuf {
    let flat: String = pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let netns = std::fs::read_link("/proc/self/ns/net")
        .ok()
        .and_then(|l| {
            l.to_str().map(|s| {
                s.trim_start_matches("net:[")
                    .trim_end_matches(']')
                    .to_string()
            })
        })
        .unwrap_or_default();
    PathBuf::from("/run/sg").join(format!("{flat}-{netns}"))
}

/// Rule metadata that the maps cannot tell: saved after every change, so a restarted
/// agent keeps ids stable and applies only the difference.
#[derive(Serialize, Deserialize, Default)]
struct Metadata {
    rules: Vec<(u32, RuleInfo)>,
    grants: Vec<(u32, Vec<RuleGrant>)>,
    interfaces: Vec<(u32, String)>,
}

enum Event {
    StateChanged,
    Reload,
    Stop,
}

pub struct Agent {
    opts: RunOptions,
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
    last_gc: Instant,
    /// Identity of the state file content last read: (device, inode, length, mtime).
    seen: Option<(u64, u64, u64, i64, i64)>,
}

/// What identifies the applied content: the parsed file (hashed once the maps are
/// programmed, off the path from change to enforcement) or an already known SHA-256 of
/// the content `Agent::doc` holds.
enum Content {
    Document(Document),
    Sha(String),
}

fn stamp(path: &Path) -> Option<(u64, u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

impl Agent {
    /// Validates the state, then adopts or creates the pins and enforces the state.
    /// Nothing is attached when the state is invalid.
    pub fn start(opts: RunOptions) -> Result<Agent, AgentError> {
        let (doc, state) = Document::load(&opts.state)?;
        system::ensure_pin_dir(&opts.pin_dir).map_err(io(format!(
            "preparing pin directory {}",
            opts.pin_dir.display()
        )))?;
        std::fs::create_dir_all(&opts.run_dir)
            .map_err(io(format!("creating {}", opts.run_dir.display())))?;
        let mut dp = Datapath::open_pinned(&opts.sizes, &opts.pin_dir)?;
        let plan = adopt(&mut dp, &opts.run_dir)?;
        if !plan.prefixes.is_empty() || !plan.interfaces.is_empty() {
            log::info!(
                "adopted pinned state: {} interfaces, {} prefixes, {} rulesets",
                plan.interfaces.len(),
                plan.prefixes.len(),
                plan.rulesets.len()
            );
        }
        let mut agent = Agent {
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
            last_gc: Instant::now(),
            seen: None,
        };
        agent.seen = stamp(&agent.opts.state);
        agent.apply(state, Content::Document(doc))?;
        Ok(agent)
    }

    /// Runs until SIGINT or SIGTERM; enforcement stays in place afterwards.
    pub fn run(mut self) -> Result<(), AgentError> {
        let (tx, rx) = mpsc::channel();
        spawn_signals(tx.clone())?;
        spawn_watcher(&self.opts.state, tx);
        if let Some(addr) = self.opts.api {
            crate::api::serve(addr, self.status.clone(), self.opts.pin_dir.clone())
                .map_err(io(format!("serving the API on {addr}")))?;
        }
        loop {
            match rx.recv_timeout(self.opts.tick) {
                Ok(Event::Stop) => {
                    log::info!("stopping; programs stay attached and maps pinned");
                    return Ok(());
                }
                Ok(Event::Reload) => {
                    log::info!("SIGHUP: re-reading {}", self.opts.state.display());
                    self.reload(true);
                }
                Ok(Event::StateChanged) => self.reload(false),
                Err(mpsc::RecvTimeoutError::Timeout) => self.tick(),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }

    /// Reads the state file; applies it when it changed and is valid, else keeps
    /// enforcing the last valid state and reports the error.
    fn reload(&mut self, force: bool) {
        let now = stamp(&self.opts.state);
        if !force && now.is_some() && now == self.seen {
            return;
        }
        self.seen = now;
        let started = Instant::now();
        let text = match std::fs::read(&self.opts.state) {
            Ok(t) => t,
            Err(e) => {
                self.fail(format!("{}: cannot read: {e}", self.opts.state.display()));
                return;
            }
        };
        let text = if force {
            text
        } else {
            match self.apply_membership(text, started) {
                Ok(()) => return,
                Err(text) => text,
            }
        };
        let len = text.len();
        match Document::parse(&self.opts.state, text) {
            Ok((doc, state)) => {
                log::debug!("parsed {len} bytes in {:.1?}", started.elapsed());
                if let Err(e) = self.apply(state, Content::Document(doc)) {
                    self.fail(format!("applying state: {e}"));
                }
            }
            Err(e) => self.fail(e.to_string()),
        }
    }

    /// Applies a change confined to network interfaces that no local interface is bound
    /// to (members joining or leaving groups) without parsing or compiling the whole
    /// state: only the changed interfaces are parsed and only their addresses' prefixes
    /// recomputed. Gives the content back when the change needs the full path.
    fn apply_membership(&mut self, text: Vec<u8>, started: Instant) -> Result<(), Vec<u8>> {
        let (Some(doc), Some(loaded)) = (self.doc.as_mut(), self.state.as_mut()) else {
            return Err(text);
        };
        let change = doc.update(&mut loaded.state, text)?;
        // From here on `doc` and `loaded.state` are the new, valid state.
        let added = &loaded.state.network_interfaces[change.at..change.at + change.added];
        let (plan, host, attach) = (&self.plan, &self.host, &self.opts.attach);
        let local = |n: &NetworkInterface| {
            plan.interfaces.values().any(|i| i.eni == n.id)
                || attach.iter().any(|(_, eni)| *eni == n.id)
                || n.mac
                    .as_deref()
                    .is_some_and(|m| host.iter().any(|h| h.mac.as_deref() == Some(m)))
        };
        // The re-parsed run can hold neighbours that did not change: they are left out.
        let changed: Vec<&NetworkInterface> = added
            .iter()
            .filter(|n| !change.removed.contains(n))
            .chain(change.removed.iter().filter(|n| !added.contains(n)))
            .collect();
        // An address held only by added interfaces has their groups; others are looked up.
        let addresses: Vec<ChangedAddress> = changed
            .iter()
            .flat_map(|n| n.addresses())
            .map(|addr| {
                let holders: Vec<&NetworkInterface> = added
                    .iter()
                    .filter(|n| n.addresses().any(|a| a == addr))
                    .collect();
                ChangedAddress {
                    addr,
                    groups: (doc.holders(&addr) as usize == holders.len()).then(|| {
                        holders
                            .iter()
                            .flat_map(|n| n.groups.iter().map(String::as_str))
                            .collect()
                    }),
                }
            })
            .collect();
        let membership = if changed.iter().any(|n| local(n)) {
            None
        } else {
            membership_change(&loaded.state, &mut self.plan, &mut self.index, &addresses)
        };
        let Some(membership) = membership else {
            // A local interface changed: the whole state is compiled again.
            let state = loaded.state.clone();
            let sha = source::sha256_hex(doc.text());
            if let Err(e) = self.apply(state, Content::Sha(sha)) {
                self.doc = None;
                self.fail(format!("applying state: {e}"));
            }
            return Ok(());
        };
        if let Err(e) = self.dp.apply(&membership.ops) {
            // The maps are now between two plans: take them as they are, and let the next
            // tick parse and compile the whole file again.
            self.doc = None;
            self.seen = None;
            match adopt(&mut self.dp, &self.opts.run_dir) {
                Ok(plan) => self.plan = plan,
                Err(e) => log::error!("reading back the maps: {e}"),
            }
            self.index = PlanIndex::new(&self.plan);
            self.fail(format!("applying a membership change: {e}"));
            return Ok(());
        }
        let programmed = started.elapsed();
        loaded.sha256 = source::sha256_hex(doc.text());
        log::info!(
            "applied state {} in {programmed:.1?} (membership of {} network interfaces): {} map operations, {} enforced interfaces",
            &loaded.sha256[..12],
            changed.len(),
            membership.ops.len(),
            self.plan.interfaces.len()
        );
        if membership.rulesets_changed {
            if let Err(e) = save_metadata(&self.opts.run_dir, &self.plan) {
                log::warn!("{e}");
            }
        }
        if self.opts.revalidate {
            match self.revalidate() {
                Ok(0) => {}
                Ok(n) => log::info!("{n} flows no longer allowed were dropped"),
                Err(e) => log::warn!("revalidating flows: {e}"),
            }
        }
        self.last_error = None;
        self.write_status();
        Ok(())
    }

    fn fail(&mut self, error: String) {
        if self.last_error.as_deref() != Some(error.as_str()) {
            log::error!("keeping the last valid state: {error}");
        }
        self.last_error = Some(error);
        self.write_status();
    }

    fn tick(&mut self) {
        // Hot plug: interfaces that appear or vanish.
        if let Ok(host) = system::interfaces() {
            if host != self.host {
                if let Some(loaded) = self.state.clone() {
                    log::info!("interfaces changed; reconciling");
                    if let Err(e) = self.apply(loaded.state, Content::Sha(loaded.sha256)) {
                        self.fail(format!("reconciling after an interface change: {e}"));
                    }
                }
            }
        }
        // Polling fallback for file changes inotify could not see.
        self.reload(false);
        if self.last_gc.elapsed() >= self.opts.gc_interval {
            self.last_gc = Instant::now();
            match self.gc() {
                Ok(0) => {}
                Ok(n) => log::debug!("conntrack GC removed {n} expired flows"),
                Err(e) => log::warn!("conntrack GC: {e}"),
            }
        }
    }

    /// Compiles `state` for the current interfaces and applies the ordered difference.
    fn apply(&mut self, state: State, content: Content) -> Result<(), AgentError> {
        let started = Instant::now();
        let host = system::interfaces().map_err(io("listing interfaces"))?;
        let bound = bind(&state, &host, &self.opts.attach);
        let locals: Vec<LocalInterface> = bound
            .iter()
            .map(|(h, eni)| LocalInterface {
                ifindex: h.ifindex,
                eni: eni.clone(),
            })
            .collect();
        let options = Options {
            default_deny: self.opts.default_deny,
        };
        let compiled = Instant::now();
        let new = compile(&state, &locals, &options, Some(&self.plan));
        let compile_time = compiled.elapsed();
        let ops = diff(&self.plan, &new);
        let links = self.opts.pin_dir.join("links");
        // Interfaces leaving enforcement lose their programs before their maps.
        for ifindex in pinned_link_ifindexes(&links) {
            if !new.interfaces.contains_key(&ifindex) {
                for kind in ["xdp", "tcin", "tcout"] {
                    datapath::unpin_link(&links.join(datapath::link_name(ifindex, kind)))?;
                }
                self.attached.remove(&ifindex);
                log::info!("ifindex {ifindex}: no longer enforced; detached");
            }
        }
        self.dp.apply(&ops)?;
        // Interfaces are attached only once their maps are filled.
        self.names.clear();
        for (h, eni) in &bound {
            if !new.interfaces.contains_key(&h.ifindex) {
                continue;
            }
            self.names.insert(h.ifindex, h.name.clone());
            if self.attached.insert(h.ifindex) {
                self.dp
                    .attach_pinned(&h.name, h.ifindex, self.opts.hook, &links)?;
                log::info!(
                    "{}: enforcing {eni} ({:?} ingress, TC egress)",
                    h.name,
                    self.opts.hook
                );
            }
        }
        self.plan = new;
        self.host = host;
        save_metadata(&self.opts.run_dir, &self.plan)?;
        let revalidated = if self.opts.revalidate {
            self.revalidate()?
        } else {
            0
        };
        let programmed = started.elapsed();
        let sha256 = match content {
            Content::Document(doc) => {
                let sha = source::sha256_hex(doc.text());
                self.doc = Some(doc);
                sha
            }
            Content::Sha(sha) => sha,
        };
        self.index = PlanIndex::new(&self.plan);
        log::info!(
            "applied state {} in {programmed:.1?} (compile {compile_time:.1?}): {} map operations, {} enforced interfaces{}",
            &sha256[..12],
            ops.len(),
            self.plan.interfaces.len(),
            if revalidated > 0 {
                format!(", {revalidated} flows no longer allowed were dropped")
            } else {
                String::new()
            }
        );
        self.state = Some(LoadedState { state, sha256 });
        self.last_error = None;
        self.write_status();
        release_free_memory();
        Ok(())
    }

    /// Strict mode (SPEC §1.10): drops tracked flows whose opening packet the current
    /// plan no longer allows.
    fn revalidate(&mut self) -> Result<usize, AgentError> {
        let mut stale = Vec::new();
        for (key, entry, established) in self.dp.flows()? {
            if !self.plan.interfaces.contains_key(&key.ifindex) {
                continue;
            }
            let (proto, port) = opening_port(&key, entry.origin);
            let remote = addr_of(key.family, &key.remote);
            if !self
                .plan
                .lookup(key.ifindex, direction_of(entry.origin), remote, proto, port)
                .allows()
            {
                stale.push((key, established));
            }
        }
        Ok(self.dp.delete_flows(&stale)?)
    }

    /// Deletes expired flows (the datapath treats them as absent already).
    fn gc(&mut self) -> Result<usize, AgentError> {
        let offset = self.dp.global()?.clock_offset_ns;
        let now = system::boot_ns() + offset;
        let mut expired = Vec::new();
        for (key, entry, established) in self.dp.flows()? {
            let timeouts = self
                .plan
                .interfaces
                .get(&key.ifindex)
                .map_or(ct::DEFAULT_TIMEOUTS, |i| i.config.timeouts);
            let slot = ct::timeout_slot(key.protocol, entry.tcp_state, entry.flags);
            if ct::is_expired(now, entry.last_seen_ns, timeouts[slot]) {
                expired.push((key, established));
            }
        }
        Ok(self.dp.delete_flows(&expired)?)
    }

    fn write_status(&mut self) {
        let interfaces: Vec<_> = self
            .plan
            .interfaces
            .iter()
            .map(|(ifindex, p)| {
                serde_json::json!({
                    "ifindex": ifindex,
                    "name": self.names.get(ifindex),
                    "network_interface": p.eni,
                    "groups": self.state.as_ref().and_then(|s| s.state.interface(&p.eni)).map(|n| n.groups.clone()).unwrap_or_default(),
                })
            })
            .collect();
        let doc = serde_json::json!({
            "agent_pid": std::process::id(),
            "state_path": self.opts.state,
            "applied_state_sha256": self.state.as_ref().map(|s| s.sha256.clone()),
            "last_error": self.last_error,
            "ingress_hook": format!("{:?}", self.opts.hook).to_lowercase(),
            "default_deny": self.opts.default_deny,
            "revalidate": self.opts.revalidate,
            "interfaces": interfaces,
            "rules": self.plan.rules.len(),
            "rulesets": self.plan.rulesets.len(),
            "prefixes": self.plan.prefixes.len(),
            "updated_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        })
        .to_string();
        if let Err(e) = self.dp.write_status(&doc) {
            log::warn!("writing status: {e}");
        }
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = doc;
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

/// Hands memory freed after a large parse or compile back to the system, so the agent's
/// resident size is what it keeps, not its peak.
#[allow(unsafe_code)]
fn release_free_memory() {
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The protocol and policy port of the packet that opened a tracked flow.
fn opening_port(key: &CtKey, origin: u8) -> (u8, u16) {
    let local = u16::from_be_bytes(key.local_port);
    let remote = u16::from_be_bytes(key.remote_port);
    let port = match key.protocol {
        PROTO_TCP | PROTO_UDP => {
            if origin == DIR_INGRESS {
                local
            } else {
                remote
            }
        }
        // Echo flows: the request (8 or 128), code 0.
        PROTO_ICMP if remote & 0x100 != 0 => 8 << 8,
        PROTO_ICMPV6 if remote & 0x100 != 0 => 128 << 8,
        _ => 0,
    };
    (key.protocol, port)
}

/// Binds network interfaces of the state to local interfaces: `--attach IFACE=ENI`
/// first, then by MAC address.
pub fn bind(
    state: &State,
    host: &[HostInterface],
    attach: &[(String, String)],
) -> Vec<(HostInterface, String)> {
    let mut out = Vec::new();
    let explicit: BTreeSet<&str> = attach.iter().map(|(i, _)| i.as_str()).collect();
    let explicit_enis: BTreeSet<&str> = attach.iter().map(|(_, e)| e.as_str()).collect();
    for (iface, eni) in attach {
        match (host.iter().find(|h| &h.name == iface), state.interface(eni)) {
            (Some(h), Some(_)) => out.push((h.clone(), eni.clone())),
            (None, _) => log::warn!("--attach {iface}={eni}: no interface {iface} here (yet)"),
            (_, None) => {
                log::warn!("--attach {iface}={eni}: no network interface {eni} in the state")
            }
        }
    }
    for ni in &state.network_interfaces {
        if explicit_enis.contains(ni.id.as_str()) {
            continue;
        }
        let Some(mac) = &ni.mac else { continue };
        if let Some(h) = host
            .iter()
            .find(|h| h.mac.as_deref() == Some(mac.as_str()) && !explicit.contains(h.name.as_str()))
        {
            out.push((h.clone(), ni.id.clone()));
        }
    }
    out
}

fn pinned_link_ifindexes(links: &Path) -> BTreeSet<u32> {
    std::fs::read_dir(links)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.split('-').next()?.parse().ok())
        })
        .collect()
}

/// The previous plan: what the maps hold, with the saved metadata when it matches them.
fn adopt(dp: &mut Datapath, run_dir: &Path) -> Result<Plan, AgentError> {
    let mut plan = dp.read_back()?;
    let path = run_dir.join("plan.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(plan);
    };
    let Ok(meta) = serde_json::from_str::<Metadata>(&text) else {
        log::warn!(
            "{}: unreadable; rebuilding ids from the maps",
            path.display()
        );
        return Ok(plan);
    };
    let rules: BTreeMap<u32, RuleInfo> = meta.rules.into_iter().collect();
    let consistent = meta.grants.iter().all(|(id, grants)| {
        let grants = grants.iter().copied().collect();
        plan.rulesets
            .get(id)
            .is_some_and(|r| r.ports == port_entries(&grants, &rules))
    }) && meta.grants.len() == plan.rulesets.len();
    if !consistent {
        log::warn!(
            "{}: does not match the pinned maps; rebuilding ids from the maps",
            path.display()
        );
        return Ok(plan);
    }
    for (id, grants) in meta.grants {
        if let Some(r) = plan.rulesets.get_mut(&id) {
            r.grants = grants.into_iter().collect();
        }
    }
    for (ifindex, eni) in meta.interfaces {
        if let Some(i) = plan.interfaces.get_mut(&ifindex) {
            i.eni = eni;
        }
    }
    plan.rules = rules;
    Ok(plan)
}

fn save_metadata(run_dir: &Path, plan: &Plan) -> Result<(), AgentError> {
    let meta = Metadata {
        rules: plan.rules.iter().map(|(id, r)| (*id, r.clone())).collect(),
        grants: plan
            .rulesets
            .iter()
            .map(|(id, r)| (*id, r.grants.iter().copied().collect()))
            .collect(),
        interfaces: plan
            .interfaces
            .iter()
            .map(|(i, p)| (*i, p.eni.clone()))
            .collect(),
    };
    let path = run_dir.join("plan.json");
    let tmp = run_dir.join("plan.json.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(
            serde_json::to_string(&meta)
                .map_err(std::io::Error::other)?
                .as_bytes(),
        )?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(io(format!("saving {}", path.display())))
}

fn spawn_signals(tx: mpsc::Sender<Event>) -> Result<(), AgentError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(io("installing signal handlers"))?;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let ev = if sig == SIGHUP {
                Event::Reload
            } else {
                Event::Stop
            };
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Watches the state file's directory with inotify: in-place writes (on close), renames
/// over it and symlink swaps all show up there.
fn spawn_watcher(state: &Path, tx: mpsc::Sender<Event>) {
    let dir = state
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut dirs = vec![dir];
    if let Ok(target) = std::fs::canonicalize(state) {
        if let Some(p) = target.parent() {
            if !dirs.iter().any(|d| d == p) {
                dirs.push(p.to_path_buf());
            }
        }
    }
    // The state file's name, and for a symlink every name on the way to the target.
    let mut names: Vec<std::ffi::OsString> = state
        .file_name()
        .map(|n| n.to_os_string())
        .into_iter()
        .collect();
    let mut link = state.to_path_buf();
    for _ in 0..8 {
        let Ok(target) = std::fs::read_link(&link) else {
            break;
        };
        let target = if target.is_absolute() {
            target
        } else {
            link.parent().unwrap_or(Path::new(".")).join(target)
        };
        names.extend(target.components().map(|c| c.as_os_str().to_os_string()));
        link = target;
    }
    std::thread::spawn(move || {
        if let Err(e) =
            crate::inotify::watch(&dirs, &names, || tx.send(Event::StateChanged).is_ok())
        {
            log::warn!("inotify unavailable ({e}); polling the state file every tick");
        }
    });
}
