//! Address prefixes and operator families: what keeps one party from
//! filling the directory or a cascade.
//!
//! * **Listing limit** (directory side): at most a few listed nodes per
//!   IPv4 /24 or IPv6 /29 ([`listing_prefix`]).
//! * **Draw diversity** (designer side): no two hops of one cascade in one
//!   IPv4 /16 or IPv6 /21 ([`draw_prefix`]), and no two of one confirmed
//!   family ([`same_family`]).
//!
//! **Why /29 and /21 for IPv6** (the cost model of `SECURITY.md`): what
//! limits a Sybil is what its address blocks cost. An IPv4 /24 is the
//! smallest routable block and leases for about $100–200 a month; an IPv6
//! /48 costs nothing (tunnel brokers hand them out), and a /32 is an
//! eighth of what one RIR membership (about €1,500 a year) allocates (a
//! /29). The block that costs about what a /24 costs is that whole /29;
//! and as a /16 is 256 /24s, a /21 is 256 /29s. Before, with 2 listed per
//! /48 and one hop per /32, one membership listed 2^19 nodes and drew 8
//! hops of one cascade.
//!
//! **Public addresses** ([`non_public`]): the directory probes only
//! addresses a designer elsewhere could reach, so that nobody can use it
//! to scan its own network (loopback, private, link-local, …) unless its
//! operator configured it for local use.
//!
//! Loopback demos put every node on 127.0.0.1; [`Diversity::AllowSameSubnet`]
//! (the CLI's `--allow-same-subnet`) lifts the prefix rule for them. It is
//! for local testing only: on a real network it lets one operator with one
//! address block hold every hop.

use std::net::IpAddr;

use crate::descriptor::Descriptor;

/// The listing-limit prefix of `ip` as text: `a.b.c.0/24` or `x:y::/29`
/// (IPv4-mapped IPv6 addresses count as IPv4).
pub fn listing_prefix(ip: IpAddr) -> String {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}::/29", s[0], s[1] & 0xfff8)
        }
    }
}

/// The draw-diversity prefix of `ip`: its IPv4 /16 or IPv6 /21, as a
/// comparable value.
pub fn draw_prefix(ip: IpAddr) -> (u8, u32) {
    match canonical(ip) {
        IpAddr::V4(v4) => (4, u32::from(v4) >> 16),
        IpAddr::V6(v6) => (6, (u128::from(v6) >> (128 - 21)) as u32),
    }
}

/// What kind of non-public address `ip` is (`"loopback"`, `"private"`,
/// `"link-local"`, …), or `None` for an address on the public Internet.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if a == 100 && (64..128).contains(&b) {
                Some("shared (carrier-grade NAT)")
            } else if v4.is_unspecified() || a == 0 {
                Some("unspecified")
            } else if v4.is_multicast() || v4.is_broadcast() || a >= 240 {
                Some("multicast or reserved")
            } else if v4.is_documentation() || (a == 198 && (b == 18 || b == 19)) {
                Some("documentation or benchmarking")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast or reserved")
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Some("documentation or benchmarking")
            } else {
                None
            }
        }
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
    /// No two hops in one IPv4 /16 or IPv6 /21 (and never two of one family).
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
        assert_eq!(listing_prefix(ip("2a01:4f8:7:1::5")), "2a01:4f8::/29");
        assert_eq!(listing_prefix(ip("2a01:4ff:ffff::5")), "2a01:4f8::/29");
        assert_eq!(listing_prefix(ip("2a01:500::1")), "2a01:500::/29");
        assert_eq!(draw_prefix(ip("10.1.2.3")), draw_prefix(ip("10.1.200.9")));
        assert_ne!(draw_prefix(ip("10.1.2.3")), draw_prefix(ip("10.2.2.3")));
        assert_eq!(
            draw_prefix(ip("2a01:4f8::1")),
            draw_prefix(ip("2a01:7ff:ffff::1"))
        );
        assert_ne!(
            draw_prefix(ip("2a01:7ff::1")),
            draw_prefix(ip("2a01:800::1"))
        );
    }

    #[test]
    fn non_public_addresses_are_named() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (a, kind) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.20.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.0.9", "link-local"),
            ("100.64.0.1", "shared (carrier-grade NAT)"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast or reserved"),
            ("192.0.2.1", "documentation or benchmarking"),
            ("::1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("fd00::1", "private (unique local)"),
            ("fe80::1", "link-local"),
            ("2001:db8::1", "documentation or benchmarking"),
        ] {
            assert_eq!(non_public(ip(a)), Some(kind), "{a}");
        }
        for a in ["8.8.8.8", "100.128.0.1", "2a01:4f8::1", "2606:4700::1111"] {
            assert_eq!(non_public(ip(a)), None, "{a}");
        }
    }
}
