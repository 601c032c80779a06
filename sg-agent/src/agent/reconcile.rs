//! Reconciling: bind the state's network interfaces to local ones, compile, apply the
//! ordered difference, attach; and the membership path, which applies a change confined to
//! non-local interfaces without a full parse or compile.

#![forbid(unsafe_code)]

use std::{collections::BTreeSet, time::Instant};

use super::{io, persist, Agent, AgentError};
use crate::{
    compile::{
        changed_addresses, changed_interfaces, compile, diff, membership_change, LocalInterface,
        Options, PlanIndex,
    },
    conntrack,
    datapath::{self, links_dir},
    model::{NetworkInterface, State},
    source::{self, Document, LoadedState, Source},
    sys::{self, HostInterface},
};

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
        let changed = changed_interfaces(added, &change.removed);
        let addresses = changed_addresses(&changed, added, |a| doc.holders(a) as usize);
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
            match persist::adopt(&mut self.dp, &self.opts.run_dir) {
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
        Ok(())
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
        let host = sys::interfaces().map_err(io("listing interfaces"))?;
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
        let links = links_dir(&self.opts.pin_dir);
        // Interfaces leaving enforcement lose their programs before their maps.
        for ifindex in datapath::pinned_link_ifindexes(&links) {
            if !new.interfaces.contains_key(&ifindex) {
                datapath::unpin_interface(&links, ifindex)?;
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
                    .attach(&h.name, h.ifindex, self.opts.hook, Some(&links))?;
                log::info!(
                    "{}: enforcing {eni} ({:?} ingress, TC egress)",
                    h.name,
                    self.opts.hook
                );
            }
        }
        self.plan = new;
        self.host = host;
        persist::save_metadata(&self.opts.run_dir, &self.plan)?;
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
