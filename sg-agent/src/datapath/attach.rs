//! The one attach path, used by the agent and the tests alike: ingress (XDP native with a
//! generic fallback, or TC) and TC egress on an interface. With a links directory the
//! links are pinned there, and links already pinned get the new program atomically (a
//! restart or an upgrade); without one they live as long as the `Datapath`.

#![forbid(unsafe_code)]

use std::path::Path;

use aya::programs::{links::FdLink, tc::SchedClassifierLink, xdp::XdpLink, TcAttachType, XdpMode};
use sg_common::{link_kind, PROG_TC_EGRESS, PROG_TC_INGRESS};

use super::{
    pins::{link_name, pin_link, pinned_link, unpin_link},
    Datapath, DatapathError, IngressHook, Result,
};

impl Datapath {
    /// Attaches `hook` ingress and TC egress to `iface` (whose index is `ifindex`). With
    /// `links_dir`, a link of the other ingress hook left by an earlier run is removed.
    pub fn attach(
        &mut self,
        iface: &str,
        ifindex: u32,
        hook: IngressHook,
        links_dir: Option<&Path>,
    ) -> Result<()> {
        if let Some(dir) = links_dir {
            // Private like the pin directory: 0700 (SPEC §6, the unit's hardening).
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .and_then(|()| {
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|source| DatapathError::Pin {
                    what: "creating",
                    path: dir.into(),
                    source,
                })?;
        }
        // Until the next refresh: the programs replaced here may be an earlier build's,
        // which open flows without stamping the presence filter.
        self.seen_off();
        let (ingress, other) = match hook {
            IngressHook::Xdp => (link_kind::XDP, link_kind::TC_INGRESS),
            IngressHook::Tc => (link_kind::TC_INGRESS, link_kind::XDP),
        };
        self.attach_one(iface, ifindex, ingress, links_dir)?;
        self.attach_one(iface, ifindex, link_kind::TC_EGRESS, links_dir)?;
        if let Some(dir) = links_dir {
            unpin_link(&dir.join(link_name(ifindex, other)))?;
        }
        Ok(())
    }

    /// One program of `kind` on `iface`: onto its pinned link when there is one, else a
    /// new link, pinned or kept.
    fn attach_one(
        &mut self,
        iface: &str,
        ifindex: u32,
        kind: &str,
        links_dir: Option<&Path>,
    ) -> Result<()> {
        let attach_err = |source| DatapathError::Attach {
            iface: iface.to_string(),
            source,
        };
        let link_err = |source| DatapathError::Link {
            iface: iface.to_string(),
            source,
        };
        let path = links_dir.map(|d| d.join(link_name(ifindex, kind)));
        let existing = match &path {
            Some(p) => pinned_link(p)?,
            None => None,
        };
        let new: Option<FdLink> = if kind == link_kind::XDP {
            let xdp = self.xdp_ingress()?;
            match existing {
                Some(link) => {
                    let link = XdpLink::try_from(link).map_err(link_err)?;
                    let id = xdp.attach_to_link(link).map_err(attach_err)?;
                    drop(xdp.take_link(id).map_err(attach_err)?);
                    None
                }
                None => {
                    let id = match xdp.attach(iface, XdpMode::Driver) {
                        Ok(id) => id,
                        Err(e) => {
                            log::warn!(
                                "{iface}: native XDP unavailable ({e}); falling back to generic XDP"
                            );
                            xdp.attach(iface, XdpMode::Skb).map_err(attach_err)?
                        }
                    };
                    Some(
                        xdp.take_link(id)
                            .map_err(attach_err)?
                            .try_into()
                            .map_err(link_err)?,
                    )
                }
            }
        } else {
            let (name, tc_kind) = if kind == link_kind::TC_INGRESS {
                (PROG_TC_INGRESS, TcAttachType::Ingress)
            } else {
                (PROG_TC_EGRESS, TcAttachType::Egress)
            };
            let prog = self.tc(name)?;
            match existing {
                Some(link) => {
                    let link = SchedClassifierLink::try_from(link).map_err(link_err)?;
                    let id = prog.attach_to_link(link).map_err(attach_err)?;
                    drop(prog.take_link(id).map_err(attach_err)?);
                    None
                }
                None => {
                    let id = prog.attach(iface, tc_kind).map_err(attach_err)?;
                    Some(
                        prog.take_link(id)
                            .map_err(attach_err)?
                            .try_into()
                            .map_err(link_err)?,
                    )
                }
            }
        };
        match (new, path) {
            (Some(link), Some(path)) => pin_link(link, &path),
            (Some(link), None) => {
                self.links.push(link);
                Ok(())
            }
            (None, _) => Ok(()),
        }
    }
}
