//! Address prefixes and operator families: what keeps one party from
//! filling the directory or a cascade.
//!
//! * **Listing limit** (directory side): at most a few listed nodes per
//!   IPv4 /24 or IPv6 /48 ([`listing_prefix`]).
//! * **Draw diversity** (designer side): no two hops of one cascade in one
//!   IPv4 /16 or IPv6 /32 ([`draw_prefix`]), and no two of one confirmed
//!   family ([`same_family`]).
//!
//! Loopback demos put every node on 127.0.0.1; [`Diversity::AllowSameSubnet`]
//! (the CLI's `--allow-same-subnet`) lifts the prefix rule for them. It is
//! for local testing only: on a real network it lets one operator with one
//! address block hold every hop.

use std::net::IpAddr;

use crate::descriptor::Descriptor;

/// The listing-limit prefix of `ip` as text: `a.b.c.0/24` or `x:y:z::/48`
/// (IPv4-mapped IPv6 addresses count as IPv4).
pub fn listing_prefix(ip: IpAddr) -> String {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
    }
}

/// The draw-diversity prefix of `ip`: its IPv4 /16 or IPv6 /32, as a
/// comparable value.
pub fn draw_prefix(ip: IpAddr) -> (u8, u32) {
    match canonical(ip) {
        IpAddr::V4(v4) => (4, u32::from(v4) >> 16),
        IpAddr::V6(v6) => (6, (u128::from(v6) >> 96) as u32),
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `a` and `b` are one confirmed family: each lists the other in
/// its own signed descriptor (a one-sided claim counts for nothing, so
/// nobody can exclude another operator's node by naming it).
pub fn same_family(a: &Descriptor, b: &Descriptor) -> bool {
    a.family.contains(&b.identity) && b.family.contains(&a.identity)
}

/// The draw rule about address prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Diversity {
    /// No two hops in one IPv4 /16 or IPv6 /32 (and never two of one family).
    #[default]
    Strict,
    /// Local testing only (`--allow-same-subnet`): hops may share a prefix;
    /// families are still kept apart.
    AllowSameSubnet,
}

impl Diversity {
    /// Whether `a` and `b` may not both be in one cascade.
    pub fn conflict(self, a: &Descriptor, b: &Descriptor) -> bool {
        same_family(a, b)
            || (self == Self::Strict && draw_prefix(a.addr.ip()) == draw_prefix(b.addr.ip()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(listing_prefix(ip("10.1.2.3")), "10.1.2.0/24");
        assert_eq!(listing_prefix(ip("::ffff:10.1.2.3")), "10.1.2.0/24");
        assert_eq!(listing_prefix(ip("2001:db8:7:1::5")), "2001:db8:7::/48");
        assert_eq!(draw_prefix(ip("10.1.2.3")), draw_prefix(ip("10.1.200.9")));
        assert_ne!(draw_prefix(ip("10.1.2.3")), draw_prefix(ip("10.2.2.3")));
        assert_eq!(
            draw_prefix(ip("2001:db8:7::1")),
            draw_prefix(ip("2001:db8:ffff::1"))
        );
        assert_ne!(
            draw_prefix(ip("2001:db8::1")),
            draw_prefix(ip("2001:db9::1"))
        );
    }
}
