//! Splitting port ranges into the aligned power-of-two blocks of the port-stage LPM trie.

/// One aligned block: the first `bits` bits of a 16-bit value equal those of `base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortBlock {
    pub base: u16,
    /// Number of leading bits that must match (0 = all 65536 values, 16 = one value).
    pub bits: u8,
}

impl PortBlock {
    pub fn contains(&self, port: u16) -> bool {
        let mask = if self.bits == 0 {
            0
        } else {
            u16::MAX << (16 - self.bits)
        };
        port & mask == self.base & mask
    }
}

/// Calls `f` with the minimal set of aligned blocks that exactly cover `from..=to`.
/// At most 30 blocks for any range (two per bit level).
pub fn split_range(from: u16, to: u16, mut f: impl FnMut(PortBlock)) {
    if from > to {
        return;
    }
    let mut lo = from as u32;
    let hi = to as u32;
    while lo <= hi {
        // Largest block that starts at `lo` (alignment) and does not pass `hi`.
        let mut size_log = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while size_log > 0 && lo + (1u32 << size_log) - 1 > hi {
            size_log -= 1;
        }
        f(PortBlock {
            base: lo as u16,
            bits: (16 - size_log) as u8,
        });
        lo += 1u32 << size_log;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn blocks(from: u16, to: u16) -> Vec<PortBlock> {
        let mut v = Vec::new();
        split_range(from, to, |b| v.push(b));
        v
    }

    #[test]
    fn whole_range_is_one_block() {
        assert_eq!(blocks(0, 65535), [PortBlock { base: 0, bits: 0 }]);
    }

    #[test]
    fn single_port_is_exact() {
        assert_eq!(
            blocks(443, 443),
            [PortBlock {
                base: 443,
                bits: 16
            }]
        );
    }

    #[test]
    fn ranges_are_covered_exactly_and_minimally() {
        for &(from, to) in &[
            (0u16, 0u16),
            (1, 65535),
            (80, 81),
            (82, 83),
            (1024, 65535),
            (1, 1023),
            (3306, 3306),
            (8000, 8999),
            (65535, 65535),
            (0, 1),
            (32767, 32768),
        ] {
            let b = blocks(from, to);
            assert!(b.len() <= 30, "{from}-{to}: {} blocks", b.len());
            for port in 0..=65535u16 {
                let inside = (from..=to).contains(&port);
                let hits = b.iter().filter(|blk| blk.contains(port)).count();
                assert_eq!(hits, inside as usize, "{from}-{to} port {port}");
            }
        }
    }
}
