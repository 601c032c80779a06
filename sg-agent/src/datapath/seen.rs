//! The flow-presence filter seen from user space (`SG_CT_SEEN`, layout in
//! `sg_common::ct::SEEN_CHUNK`). The datapath stamps a flow's slot before it inserts the
//! flow; the agent keeps every listed flow's slot fresh and moves the epoch on, so stamps
//! of flows long gone stop counting. The filter is trusted only after a refresh: loading
//! and every attach switch it off, since programs of an earlier build (which never stamp)
//! may have opened flows until then.

#![forbid(unsafe_code)]

use std::{os::fd::AsFd, time::Duration};

use sg_common::{
    ct::{seen_next, seen_place, SEEN_CHUNK, SEEN_EPOCH, SEEN_MASK, SEEN_ON},
    registry, CtKey,
};

use super::{sys_err, Datapath, DatapathError, Result};
use crate::sys::SharedBytes;

/// Longer than any program run: after it, no program still works with what it read of the
/// header before a change.
const GRACE: Duration = Duration::from_millis(50);

/// The filter's bytes, mapped.
pub(super) struct Seen {
    bytes: SharedBytes,
    mask: u32,
}

impl Seen {
    /// Maps the loaded filter, writes its slot mask and switches it off.
    pub(super) fn open(ebpf: &aya::Ebpf) -> Result<Seen> {
        let name = registry::CT_SEEN.name;
        let Some(aya::maps::Map::Array(data)) = ebpf.map(name) else {
            return Err(DatapathError::MissingMap(name));
        };
        let entries = data
            .info()
            .map_err(|source| DatapathError::Map { name, source })?
            .max_entries();
        if entries < 2 {
            return Err(DatapathError::MissingMap(name));
        }
        let bytes = SharedBytes::map(data.fd().as_fd(), entries as usize * SEEN_CHUNK as usize)
            .map_err(sys_err(name, "mmap"))?;
        let seen = Seen {
            bytes,
            mask: (entries - 1) * SEEN_CHUNK - 1,
        };
        seen.off();
        for (i, b) in seen.mask.to_le_bytes().into_iter().enumerate() {
            seen.bytes.store(SEEN_MASK + i, b);
        }
        Ok(seen)
    }

    fn off(&self) {
        self.bytes.store(SEEN_ON, 0);
    }

    fn is_on(&self) -> bool {
        self.bytes.load(SEEN_ON) != 0
    }

    fn epoch(&self) -> u8 {
        self.bytes.load(SEEN_EPOCH)
    }

    fn stamp(&self, key: &CtKey, epoch: u8) {
        let (chunk, byte) = seen_place(key, self.mask);
        self.bytes
            .store(chunk as usize * SEEN_CHUNK as usize + byte, epoch);
    }
}

impl Datapath {
    /// Stops the datapath from trusting the filter until the next refresh.
    pub(super) fn seen_off(&self) {
        if let Some(s) = &self.seen {
            s.off();
        }
    }

    /// Stamps the slots of flows about to be inserted from user space.
    pub(super) fn seen_stamp(&self, keys: impl Iterator<Item = CtKey>) {
        if let Some(s) = &self.seen {
            let epoch = s.epoch();
            if epoch != 0 {
                keys.for_each(|k| s.stamp(&k, epoch));
            }
        }
    }

    /// Stamps every flow of both tables with the current epoch, then trusts the filter and
    /// moves the epoch on: a slot last stamped two epochs ago holds no flow. Off, the
    /// filter is given an epoch and a grace period first, so that every flow a program
    /// inserts from then on is stamped or listed here. Returns how many flows it stamped.
    pub fn refresh_seen(&self) -> Result<usize> {
        let Some(s) = &self.seen else {
            return Ok(0);
        };
        let mut epoch = s.epoch();
        if !s.is_on() {
            if epoch == 0 {
                epoch = 1;
                s.bytes.store(SEEN_EPOCH, epoch);
            }
            std::thread::sleep(GRACE);
        }
        let keys = self.tables().flow_keys()?;
        for k in &keys {
            s.stamp(k, epoch);
        }
        s.bytes.store(SEEN_ON, 1);
        s.bytes.store(SEEN_EPOCH, seen_next(epoch));
        Ok(keys.len())
    }

    /// Whether the datapath trusts the filter now (tests, status).
    pub fn seen_is_on(&self) -> bool {
        self.seen.as_ref().is_some_and(Seen::is_on)
    }
}
