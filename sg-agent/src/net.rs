//! CIDRs and address families, as the datapath sees them: network-order bytes.

#![forbid(unsafe_code)]

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Family::V4 => sg_common::FAMILY_V4,
            Family::V6 => sg_common::FAMILY_V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// An IPv4 or IPv6 prefix with no host bits set. IPv4 uses the first 4 bytes of `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    family: Family,
    addr: [u8; 16],
    len: u8,
}

impl Cidr {
    pub const ANY_V4: Cidr = Cidr {
        family: Family::V4,
        addr: [0; 16],
        len: 0,
    };
    pub const ANY_V6: Cidr = Cidr {
        family: Family::V6,
        addr: [0; 16],
        len: 0,
    };

    /// The prefix of `len` bits containing `addr` (host bits cleared).
    pub fn truncate(addr: IpAddr, len: u8) -> Cidr {
        let family = Family::of(&addr);
        let mut bytes = [0u8; 16];
        match addr {
            IpAddr::V4(a) => bytes[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => bytes = a.octets(),
        }
        let len = len.min(family.bits());
        Cidr {
            family,
            addr: mask(bytes, len),
            len,
        }
    }

    /// The single-address prefix of `addr` (/32 or /128).
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr::truncate(addr, 128)
    }

    pub fn family(&self) -> Family {
        self.family
    }

    #[allow(clippy::len_without_is_empty)] // a prefix length, not a collection's
    pub fn len(&self) -> u8 {
        self.len
    }

    pub fn is_host(&self) -> bool {
        self.len == self.family.bits()
    }

    pub fn is_any(&self) -> bool {
        self.len == 0
    }

    /// Network-order address bytes; 16 bytes, IPv4 in the first 4.
    pub fn bytes(&self) -> [u8; 16] {
        self.addr
    }

    pub fn addr(&self) -> IpAddr {
        match self.family {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(
                self.addr[0],
                self.addr[1],
                self.addr[2],
                self.addr[3],
            )),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(self.addr)),
        }
    }

    pub fn contains(&self, addr: &IpAddr) -> bool {
        Family::of(addr) == self.family && Cidr::truncate(*addr, self.len).addr == self.addr
    }

    /// The prefix of this one shortened to `len` bits.
    pub fn parent(&self, len: u8) -> Cidr {
        Cidr {
            family: self.family,
            addr: mask(self.addr, len.min(self.len)),
            len: len.min(self.len),
        }
    }
}

fn mask(mut bytes: [u8; 16], len: u8) -> [u8; 16] {
    for (i, b) in bytes.iter_mut().enumerate() {
        let bit = i as u32 * 8;
        let keep = (len as u32).saturating_sub(bit).min(8);
        *b &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
    }
    bytes
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.len)
    }
}

/// Why a CIDR did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CidrError(pub String);

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `a.b.c.d/n` or `x::y/n`. Host bits must be clear (as EC2 requires).
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| CidrError(format!("{s:?} is not a CIDR (expected address/length)")))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| CidrError(format!("{s:?} is not a CIDR: bad address {addr:?}")))?;
        let max = Family::of(&addr).bits();
        let len: u8 = len.parse().ok().filter(|l| *l <= max).ok_or_else(|| {
            CidrError(format!(
                "{s:?} is not a CIDR: prefix length must be 0-{max}"
            ))
        })?;
        let cidr = Cidr::truncate(addr, len);
        if cidr.addr() != addr {
            return Err(CidrError(format!(
                "{s:?} has host bits set; the network is {cidr}"
            )));
        }
        Ok(cidr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_cidrs() {
        let ok = [
            "0.0.0.0/0",
            "198.18.0.0/15",
            "198.18.0.5/32",
            "::/0",
            "2001:db8::/32",
            "2001:db8::1/128",
        ];
        for s in ok {
            assert_eq!(s.parse::<Cidr>().unwrap().to_string(), s, "{s}");
        }
        let bad = [
            "198.18.0.5/24",
            "198.18.0.0",
            "198.18.0.0/33",
            "2001:db8::/129",
            "x/8",
            "10.0.0.0/-1",
            "2001:db8::1/64",
        ];
        for s in bad {
            assert!(s.parse::<Cidr>().is_err(), "{s}");
        }
    }

    #[test]
    fn contains_respects_family_and_length() {
        let c: Cidr = "198.18.0.0/24".parse().unwrap();
        assert!(c.contains(&"198.18.0.200".parse().unwrap()));
        assert!(!c.contains(&"198.18.1.1".parse().unwrap()));
        assert!(!c.contains(&"::ffff:198.18.0.1".parse().unwrap()));
        assert!(Cidr::ANY_V6.contains(&"2001:db8::1".parse().unwrap()));
        assert!(!Cidr::ANY_V4.contains(&"2001:db8::1".parse().unwrap()));
    }
}
