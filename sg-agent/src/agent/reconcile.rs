//! Reconciling: bind the state's network interfaces to local ones, compile, apply the
//! ordered difference, attach; and the membership path, which applies a change confined to
//! non-local interfaces without a full parse or compile.

#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Instant, SystemTime},
};

use super::{io, persist, Agent, AgentError};
use sg_common::{link_kind, registry};

use crate::{
    compile::{
        changed_interfaces, compile, diff, interfaces_change, LocalInterface, Options, PlanIndex,
    },
    conntrack,
    datapath::{self, link_name, links_dir, IngressHook},
    model::{NetworkInterface, Peer, State},
    source::{self, Document, LoadedState, Source},
    sys::{self, HostInterface},
};

/// An enforced interface that the current state no longer binds (its ENI was removed,
/// its MAC changed, a key was mistyped): it keeps its last valid definition until the
/// state lists its ENI with no groups, the interface leaves the host, or an operator
/// detaches it (SPEC §4).
#[derive(Clone, Debug)]
pub struct Orphan {
    pub name: String,
    /// Its network interface as the last valid state defined it.
    pub interface: NetworkInterface,
    pub since: SystemTime,
}

/// What identifies the applied content: the parsed file (hashed once the maps are
/// programmed, off the path from change to enforcement) or an already known SHA-256 of
/// the content `Agent::doc` holds.
pub(super) enum Content {
    Document(Document),
    Sha(String),
}

impl Agent {
    /// Reads the state; applies it when it changed and is valid, else keeps enforcing the
    /// last valid state and reports the error.
    pub(super) fn reload(&mut self, force: bool) {
        let now = super::watch::identity(&self.opts.state);
        if !force && now.is_some() && now == self.seen {
            return;
        }
        if super::watch::still_being_written(&self.opts.state) {
            // Its writer's close wakes the watcher again; until then, nothing changes.
            log::debug!(
                "{}: still open for writing; waiting for it to be closed",
                self.opts.state.display()
            );
            return;
        }
        self.seen = now;
        let started = Instant::now();
        let text = match self.source.read() {
            Ok(t) => t,
            Err(e) => {
                self.fail(e.to_string());
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
        // Orphans live in the compiled state but not in the file: the full path keeps them.
        if !self.orphans.is_empty() {
            return Err(text);
        }
        let (Some(mut doc), Some(loaded)) = (self.doc.take(), self.state.as_mut()) else {
            return Err(text);
        };
        let change = match doc.update(&mut loaded.state, text) {
            Ok(c) => c,
            Err(text) => {
                self.doc = Some(doc);
                return Err(text);
            }
        };
        // From here on `doc` and `loaded.state` are the new, valid state.
        let added = loaded.state.network_interfaces[change.at..change.at + change.added].to_vec();
        let sha = source::sha256_hex(doc.text());
        let holders = |a: &std::net::IpAddr| doc.holders(a) as usize;
        if self.apply_interfaces(added, change.removed, holders, sha, started) {
            // Kept only when applied: otherwise the next change takes the full path.
            self.doc = Some(doc);
        }
        Ok(())
    }

    /// The membership path's common part (file and etcd): `added` replaced `removed` in
    /// the loaded state, which is valid; `sha` identifies its content. Applies the change
    /// incrementally, or compiles the whole state when a local interface changed. False
    /// when applying failed (the next change must take the full path).
    pub(super) fn apply_interfaces(
        &mut self,
        added: Vec<NetworkInterface>,
        removed: Vec<NetworkInterface>,
        holders: impl Fn(&std::net::IpAddr) -> usize,
        sha: String,
        started: Instant,
    ) -> bool {
        let Some(loaded) = self.state.as_mut() else {
            return false;
        };
        let (host, attach) = (&self.host, &self.opts.attach);
        let is_local = |plan: &crate::compile::Plan, n: &NetworkInterface| {
            plan.interfaces.values().any(|i| i.eni == n.id)
                || attach.iter().any(|(_, eni)| *eni == n.id)
                || n.mac
                    .as_deref()
                    .is_some_and(|m| host.iter().any(|h| h.mac.as_deref() == Some(m)))
        };
        let changed = changed_interfaces(&added, &removed).len();
        let summary = crate::change::ChangeSummary::between(
            &State {
                network_interfaces: removed.clone(),
                ..State::default()
            },
            &State {
                network_interfaces: added.clone(),
                ..State::default()
            },
        );
        log::info!("change: {}", summary.one_line());
        let membership = interfaces_change(
            &loaded.state,
            &mut self.plan,
            &mut self.index,
            &added,
            &removed,
            holders,
            is_local,
        );
        let Some(membership) = membership else {
            // A local interface changed: the whole state is compiled again.
            let state = loaded.state.clone();
            if let Err(e) = self.apply(state, Content::Sha(sha)) {
                self.fail(format!("applying state: {e}"));
                return false;
            }
            return true;
        };
        if let Err(e) = self.dp.apply(&membership.ops) {
            // The maps are now between two plans: take them as they are, and let the next
            // change parse and compile the whole state again.
            self.seen = None;
            match persist::adopt(&mut self.dp, &self.opts.run_dir) {
                Ok(plan) => self.plan = plan,
                Err(e) => log::error!("reading back the maps: {e}"),
            }
            self.index = PlanIndex::new(&self.plan);
            self.fail(format!("applying a membership change: {e}"));
            return false;
        }
        let programmed = started.elapsed();
        self.stats.applies += 1;
        self.stats.map_operations += membership.ops.len() as u64;
        self.stats.applied_unix = crate::status::unix_now();
        loaded.sha256 = sha;
        log::info!(
            "applied state {} in {programmed:.1?} (membership of {changed} network interfaces): {} map operations, {} enforced interfaces",
            &loaded.sha256[..12],
            membership.ops.len(),
            self.plan.interfaces.len()
        );
        if membership.rulesets_changed {
            if let Err(e) = persist::save_metadata(&self.opts.run_dir, &self.plan) {
                log::warn!("{e}");
            }
        }
        if self.opts.revalidate {
            match conntrack::revalidate(&mut self.dp, &self.plan) {
                Ok(0) => {}
                Ok(n) => log::info!("{n} flows no longer allowed were dropped"),
                Err(e) => log::warn!("revalidating flows: {e}"),
            }
        }
        self.last_error = None;
        self.write_status();
        true
    }

    /// Hot plug: interfaces that appeared or vanished are bound or released.
    pub(super) fn hot_plug(&mut self) {
        let Ok(host) = sys::interfaces() else {
            return;
        };
        if host == self.host {
            return;
        }
        if let Some(loaded) = self.state.clone() {
            log::info!("interfaces changed; reconciling");
            if let Err(e) = self.apply(loaded.state, Content::Sha(loaded.sha256)) {
                self.fail(format!("reconciling after an interface change: {e}"));
            }
        }
    }

    /// Compiles `state` for the current interfaces and applies the ordered difference.
    pub(super) fn apply(&mut self, state: State, content: Content) -> Result<(), AgentError> {
        let started = Instant::now();
        for w in &state.warnings {
            log::warn!("{}: {w}", self.opts.state.display());
        }
        let host = sys::interfaces().map_err(io("listing interfaces"))?;
        let mut bound = bind(&state, &host, &self.opts.attach);
        let orphans = self.orphans_of(&state, &host, &bound);
        let orphaned_state;
        let effective = if orphans.is_empty() {
            &state
        } else {
            orphaned_state = with_orphans(&state, &self.known, &orphans, &host, &mut bound);
            &orphaned_state
        };
        let locals: Vec<LocalInterface> = bound
            .iter()
            .map(|(h, eni)| LocalInterface {
                ifindex: h.ifindex,
                eni: eni.clone(),
            })
            .collect();
        let options = Options {
            default_deny: self.opts.default_deny,
            audit: self.opts.audit,
        };
        let compiled = Instant::now();
        let new = compile(effective, &locals, &options, Some(&self.plan));
        let compile_time = compiled.elapsed();
        let ops = diff(&self.plan, &new);
        let links = links_dir(&self.opts.pin_dir);
        // Interfaces leaving enforcement lose their programs before their maps.
        for ifindex in datapath::pinned_link_ifindexes(&links) {
            if !new.interfaces.contains_key(&ifindex) {
                datapath::unpin_interface(&links, ifindex)?;
                self.attached.remove(&ifindex);
                log::info!(
                    "{} ({}, ifindex {ifindex}): no longer enforced; detached",
                    self.names.get(&ifindex).map_or("?", |n| n.as_str()),
                    self.plan
                        .interfaces
                        .get(&ifindex)
                        .map_or("?", |p| p.eni.as_str()),
                );
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
            if h.bond_master && self.opts.hook == IngressHook::Xdp {
                // XDP on a bond sees the slaves' ifindexes: it would miss the interface's
                // entry and pass everything. Refuse rather than enforce nothing.
                return Err(AgentError::XdpOnBond {
                    iface: h.name.clone(),
                });
            }
            if self.attached.insert(h.ifindex) {
                self.dp
                    .attach(&h.name, h.ifindex, self.opts.hook, Some(&links))?;
                log::info!(
                    "{}: enforcing {eni} ({:?} ingress, TC egress)",
                    h.name,
                    self.opts.hook
                );
            }
        }
        for (ifindex, o) in &orphans {
            if !self.orphans.contains_key(ifindex) {
                log::warn!(
                    "{} ({}): orphaned: the new state no longer binds it; it keeps its last valid policy (list {} with no groups, or run `sg-agent detach --interface {}`, to stop enforcing it)",
                    o.name, o.interface.id, o.interface.id, o.name
                );
            }
        }
        let known = known_locals(effective, &bound);
        let change = match &self.state {
            Some(previous) => crate::change::ChangeSummary::between(&previous.state, &state),
            None => crate::change::ChangeSummary::between(&State::default(), &state),
        };
        if !change.is_empty() {
            log::info!("change: {}", change.one_line());
        }
        self.plan = new;
        self.host = host;
        self.orphans = orphans;
        persist::save_metadata(&self.opts.run_dir, &self.plan)?;
        persist::save_known(&self.opts.run_dir, &known)?;
        self.known = known;
        let revalidated = if self.opts.revalidate {
            conntrack::revalidate(&mut self.dp, &self.plan)?
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
        self.stats.applies += 1;
        self.stats.map_operations += ops.len() as u64;
        self.stats.applied_unix = crate::status::unix_now();
        *self.labels.lock().unwrap_or_else(|p| p.into_inner()) =
            crate::events::Labels::of(&self.plan, &self.names, Some(&state));
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
        sys::release_free_memory();
        Ok(())
    }
}

impl Agent {
    /// The enforced interfaces that `state` (bound as `bound`) no longer binds and that
    /// keep enforcing: still on the host, not explicitly listed with no groups, and with
    /// a last valid definition to keep.
    fn orphans_of(
        &self,
        state: &State,
        host: &[HostInterface],
        bound: &[(HostInterface, String)],
    ) -> BTreeMap<u32, Orphan> {
        let mut out = BTreeMap::new();
        for (ifindex, enforced) in &self.plan.interfaces {
            if bound.iter().any(|(h, _)| h.ifindex == *ifindex) {
                continue;
            }
            let Some(h) = host.iter().find(|h| h.ifindex == *ifindex) else {
                continue; // Gone from the host: nothing to enforce.
            };
            let previous = self.orphans.get(ifindex);
            let definition = previous
                .map(|o| o.interface.clone())
                .or_else(|| self.known.interface(&enforced.eni).cloned());
            let Some(definition) = definition else {
                log::warn!(
                    "{} ({}): the new state no longer binds it and no last valid definition is known; it is no longer enforced",
                    h.name, enforced.eni
                );
                continue;
            };
            if state
                .interface(&definition.id)
                .is_some_and(|n| n.groups.is_empty() && !self.opts.default_deny)
            {
                continue; // Listed with no groups: released on purpose.
            }
            out.insert(
                *ifindex,
                Orphan {
                    name: h.name.clone(),
                    interface: definition,
                    since: previous.map_or_else(SystemTime::now, |o| o.since),
                },
            );
        }
        out
    }

    /// SPEC §6: the agent's programs, links and pins must still be in place; whatever
    /// removed them is reported, counted, and undone at once.
    pub(super) fn check_enforcement(&mut self) {
        let pin_dir = self.opts.pin_dir.clone();
        let links = links_dir(&pin_dir);
        let mut lost: Vec<String> = registry::MAPS
            .iter()
            .filter(|m| !pin_dir.join(m.name).exists())
            .map(|m| format!("map pin {}", m.name))
            .collect();
        let ingress = match self.opts.hook {
            IngressHook::Xdp => link_kind::XDP,
            IngressHook::Tc => link_kind::TC_INGRESS,
        };
        let mut relink = Vec::new();
        for ifindex in &self.attached {
            for kind in [ingress, link_kind::TC_EGRESS] {
                if !links.join(link_name(*ifindex, kind)).exists() {
                    lost.push(format!(
                        "{} link of {}",
                        kind,
                        self.names
                            .get(ifindex)
                            .cloned()
                            .unwrap_or(ifindex.to_string())
                    ));
                    relink.push(*ifindex);
                }
            }
        }
        if lost.is_empty() {
            return;
        }
        self.enforcement_lost += 1;
        self.last_lost = Some(SystemTime::now());
        log::error!(
            "enforcement lost: {} removed by someone else; restoring",
            lost.join(", ")
        );
        let restored = sys::ensure_pin_dir(&pin_dir)
            .map_err(io(format!("preparing pin directory {}", pin_dir.display())))
            .and_then(|()| self.dp.repin_missing(&pin_dir).map_err(AgentError::from));
        if let Err(e) = restored {
            self.fail(format!("restoring pins: {e}"));
            return;
        }
        for ifindex in relink {
            self.attached.remove(&ifindex);
        }
        if let Some(loaded) = self.state.clone() {
            match self.apply(loaded.state, Content::Sha(loaded.sha256)) {
                Ok(()) => {
                    self.stats.enforcement_restored += 1;
                    log::info!("enforcement restored");
                }
                Err(e) => self.fail(format!("restoring enforcement: {e}")),
            }
        }
    }
}

/// `state` with the orphans added back: each as its last valid definition (under its own
/// id, or `<id> (orphaned)` when the state gives the id to another definition), with the
/// groups and prefix lists it needs that the state no longer has; `bound` gains them.
fn with_orphans(
    state: &State,
    known: &State,
    orphans: &BTreeMap<u32, Orphan>,
    host: &[HostInterface],
    bound: &mut Vec<(HostInterface, String)>,
) -> State {
    let mut out = state.clone();
    for (ifindex, o) in orphans {
        let mut n = o.interface.clone();
        if out.interface(&n.id).is_some() {
            n.id = format!("{} (orphaned)", n.id);
        }
        add_groups(known, &mut out, n.groups.clone());
        if let Some(h) = host.iter().find(|h| h.ifindex == *ifindex) {
            bound.push((h.clone(), n.id.clone()));
        }
        out.network_interfaces.push(n);
    }
    out
}

/// What `Agent::known` keeps of `state`: the bound interfaces' definitions and the groups
/// and prefix lists they use, directly or through group references.
fn known_locals(state: &State, bound: &[(HostInterface, String)]) -> State {
    let mut out = State::default();
    let mut wanted: Vec<String> = Vec::new();
    for (_, eni) in bound {
        if let Some(n) = state.interface(eni) {
            let mut n = n.clone();
            n.id = n.id.trim_end_matches(" (orphaned)").to_string();
            wanted.extend(n.groups.iter().cloned());
            if out.interface(&n.id).is_none() {
                out.network_interfaces.push(n);
            }
        }
    }
    add_groups(state, &mut out, wanted);
    out
}

/// Adds to `into` the groups `wanted` that it lacks, as `from` defines them, with the
/// groups and prefix lists their rules reference, transitively.
fn add_groups(from: &State, into: &mut State, mut wanted: Vec<String>) {
    while let Some(id) = wanted.pop() {
        if into.group(&id).is_some() {
            continue;
        }
        let Some(g) = from.group(&id) else { continue };
        for peer in g.ingress.iter().chain(&g.egress).flat_map(|r| &r.peers) {
            match peer {
                Peer::Group(other) => wanted.push(other.clone()),
                Peer::PrefixList(list) if into.prefix_list(list).is_none() => {
                    if let Some(p) = from.prefix_list(list) {
                        into.prefix_lists.push(p.clone());
                    }
                }
                _ => {}
            }
        }
        into.security_groups.push(g.clone());
    }
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
        // A bond's slaves share its MAC: the bond is the interface (SPEC §4).
        if let Some(h) = host.iter().find(|h| {
            h.mac.as_deref() == Some(mac.as_str())
                && !h.enslaved
                && !explicit.contains(h.name.as_str())
        }) {
            out.push((h.clone(), ni.id.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(
        name: &str,
        ifindex: u32,
        mac: &str,
        bond_master: bool,
        enslaved: bool,
    ) -> HostInterface {
        HostInterface {
            name: name.into(),
            ifindex,
            mac: Some(mac.into()),
            bond_master,
            enslaved,
        }
    }

    #[test]
    fn a_bond_is_bound_by_its_mac_not_its_slaves() {
        let state = crate::source::parse_str(
            "[[security_group]]\nid = \"sg-a\"\n[[interface]]\nid = \"eni-1\"\nmac = \"02:5e:00:00:00:01\"\ngroups = [\"sg-a\"]\n",
        )
        .unwrap();
        // Slaves come first by ifindex, as the kernel numbers them before the bond.
        let hosts = [
            host("eth0", 2, "02:5e:00:00:00:01", false, true),
            host("eth1", 3, "02:5e:00:00:00:01", false, true),
            host("bond0", 4, "02:5e:00:00:00:01", true, false),
        ];
        let bound = bind(&state, &hosts, &[]);
        assert_eq!(bound.len(), 1);
        assert_eq!(bound[0].0.name, "bond0");
    }
}
