//! An emulated WAN for `mixnn bench paper --rtt R`: every node in its own
//! network namespace, every link with round-trip time R.
//!
//! Layout for this process (pid P, subnet index s, node i = 0, 1, …):
//!
//! ```text
//!  root namespace (designer)                 namespace mixnn-P-i (node i)
//!  bridge mxbP  10.213.s.1/24  ── veth mxvPn<i> ──── eth0 10.213.s.(10+i)/24
//!               10.214.s.1/32  designer listens here   node listens on
//!               10.214.s.(10+i)/32 → relay, R/2 each    10.213.s.(10+i):7000
//!                 way, to 10.213.s.(10+i):7000         lo 10.214.s.1/32 → relay,
//!               10.213.s.1:7101 → relay, R/2 each way,    no delay, to
//!                 to the designer at 10.214.s.1:7100      10.213.s.1:7101
//!                                                     route 10.214.s.0/24 via 10.213.s.1
//! ```
//!
//! The cascade file advertises node i at `10.214.s.(10+i):7000`. The
//! designer, and every other node (whose route for 10.214.s.0/24 leads
//! over its veth and the bridge), reaches node i through a relay in the
//! root namespace that holds every byte R/2 in each direction; nodes
//! deliver to the designer's `10.214.s.1:7100` (the first hop) or
//! `10.214.s.1:7101` (the last hop: the designer faces each end with an
//! address and key of its own) through a plain relay in their own
//! namespace and a delaying one in the root namespace (`10.213.s.1:7101`
//! and `:7102`). So every
//! link the cascade uses (designer→node, node→node, node→designer) has
//! round-trip time R, and every byte crosses a real veth pair and bridge.
//!
//! The delay is added in user space (see [`crate::bench::relay`]) rather
//! than with `tc qdisc … netem`, which many kernels (this project's CI
//! machines among them) are built without; relays delay the bytes a
//! connection carries, not TCP's own acknowledgements.
//!
//! [`Wan`] removes everything when dropped, the signal handler of
//! [`crate::cascade::install_cleanup`] does too (via [`cleanup_hook`]),
//! and [`remove_stale`] removes what a crashed run left (names carry the
//! pid of the process that made them).

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use mixnn_designer::HopInfo;
use serde::Serialize;

use crate::bench::relay::{self, EchoServer, Relay};
use crate::cascade::NodeLaunch;

/// Prefix of the namespace names: `mixnn-<pid>-<i>`.
const NS_PREFIX: &str = "mixnn-";
/// Prefix of the bridge: `mxb<pid>`.
const BRIDGE_PREFIX: &str = "mxb";
/// Prefix of the root ends of the veth pairs: `mxv<pid>n<i>`.
const VETH_PREFIX: &str = "mxv";
/// Port every node listens on (inside its own namespace).
const NODE_PORT: u16 = 7000;
/// Port the designer listens on (at its advertised address).
const DESIGNER_PORT: u16 = 7100;
/// Port of the echo server in each node's namespace (round-trip probes).
const ECHO_PORT: u16 = 7001;
/// Port of the root namespace's relay in front of the designer.
const DESIGNER_RELAY_PORT: u16 = 7101;
/// Port of the root namespace's relay in front of the designer's second
/// end (the last hop delivers there, at `DESIGNER_PORT + 1`).
const DESIGNER_LAST_RELAY_PORT: u16 = 7102;
/// Handshakes per measured link.
const PROBES: usize = 5;

/// The error for `--rtt` without root.
pub const NEED_ROOT: &str = "--rtt needs root (network namespaces); run as root or use --rtt 0";

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Fails with [`NEED_ROOT`] unless root with `ip` at hand.
pub fn require_root() -> anyhow::Result<()> {
    if !is_root() {
        bail!("{NEED_ROOT}");
    }
    if Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        bail!("--rtt needs the `ip` command (iproute2)");
    }
    Ok(())
}

/// Round-trip times measured on the emulated WAN, in milliseconds: the
/// median of 5 one-byte round trips to an echo server at the far end of
/// the same path (relays, veths, bridge) the cascade's bytes take.
#[derive(Debug, Clone, Serialize)]
pub struct MeasuredRtt {
    /// Designer → node i's namespace, per node.
    pub designer_node_ms: Vec<f64>,
    /// Node 0's namespace → node 1's (`None` with a single node).
    pub node_node_ms: Option<f64>,
    /// Node 0's namespace → the designer's address.
    pub node_designer_ms: Option<f64>,
}

impl MeasuredRtt {
    /// The median over every measured link.
    pub fn median_ms(&self) -> f64 {
        let mut all = self.designer_node_ms.clone();
        all.extend(self.node_node_ms);
        all.extend(self.node_designer_ms);
        crate::progress::median(&all)
    }
}

/// The emulated WAN of one cascade run; removed when dropped.
pub struct Wan {
    pid: u32,
    subnet: u8,
    nodes: usize,
    one_way: Duration,
    relays: Vec<Relay>,
    ns_relays: Vec<Child>,
}

fn real(subnet: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 213, subnet, host)
}

fn virt(subnet: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 214, subnet, host)
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

fn ns_name(pid: u32, i: usize) -> String {
    format!("{NS_PREFIX}{pid}-{i}")
}

/// Runs `ip ARGS…`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip ARGS…`'s stdout, empty on any failure.
fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A subnet index `s` such that no address of 10.213.s.0/24 or
/// 10.214.s.0/24 is in use here.
fn free_subnet(pid: u32) -> anyhow::Result<u8> {
    let used = ip_output(&["-4", "-o", "addr", "show"]) + &ip_output(&["-4", "route", "show"]);
    let start = (pid % 200) as u8;
    for k in 0..250u16 {
        let s = ((u16::from(start) + k) % 250 + 1) as u8;
        if !used.contains(&format!("10.213.{s}.")) && !used.contains(&format!("10.214.{s}.")) {
            return Ok(s);
        }
    }
    bail!("no free subnet in 10.213.0.0/16")
}

impl Wan {
    /// Makes `nodes` namespaces and the relays between them, each link with
    /// round-trip time `rtt`. Needs root.
    pub fn create(nodes: usize, rtt: Duration) -> anyhow::Result<Wan> {
        require_root()?;
        if nodes == 0 || nodes > 200 {
            bail!("--rtt supports 1 to 200 nodes, not {nodes}");
        }
        crate::cascade::add_cleanup_hook(cleanup_hook);
        let pid = std::process::id();
        let subnet = free_subnet(pid)?;
        let mut wan = Wan {
            pid,
            subnet,
            nodes,
            one_way: rtt / 2,
            relays: Vec::new(),
            ns_relays: Vec::new(),
        };
        // On any error below, dropping `wan` removes what was made.
        wan.build()
            .context("setting up network namespaces for --rtt")?;
        Ok(wan)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let (pid, s) = (self.pid, self.subnet);
        let bridge = format!("{BRIDGE_PREFIX}{pid}");
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}/24", real(s, 1)), "dev", &bridge])?;
        ip(&["addr", "add", &format!("{}/32", virt(s, 1)), "dev", &bridge])?;
        for i in 0..self.nodes {
            let host = format!("{}/32", virt(s, node_host(i)));
            ip(&["addr", "add", &host, "dev", &bridge])?;
        }
        ip(&["link", "set", &bridge, "up"])?;
        let exe = std::env::current_exe().context("locating the mixnn binary")?;
        for i in 0..self.nodes {
            let ns = ns_name(pid, i);
            let veth = format!("{VETH_PREFIX}{pid}n{i}");
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &bridge])?;
            ip(&["link", "set", &veth, "up"])?;
            let own = format!("{}/24", real(s, node_host(i)));
            ip(&["-n", &ns, "addr", "add", &own, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let designer = format!("{}/32", virt(s, 1));
            ip(&["-n", &ns, "addr", "add", &designer, "dev", "lo"])?;
            let others = format!("10.214.{s}.0/24");
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                &others,
                "via",
                &real(s, 1).to_string(),
            ])?;
            // The node's relays in front of the designer's two ends (the
            // first hop delivers to one, the last to the other): no delay
            // here, the root namespace's relays add it.
            for (listen, to, echo) in [
                (self.designer_listen(), DESIGNER_RELAY_PORT, true),
                (self.designer_last(), DESIGNER_LAST_RELAY_PORT, false),
            ] {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns])
                    .arg(&exe)
                    .args(["bench", "relay", "--listen"])
                    .arg(listen.to_string())
                    .arg("--to")
                    .arg(sock(real(s, 1), to).to_string());
                if echo {
                    c.arg("--echo")
                        .arg(sock(real(s, node_host(i)), ECHO_PORT).to_string());
                }
                let mut child = c
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .with_context(|| format!("starting the relay in {ns}"))?;
                let stdout = child.stdout.take().context("relay stdout")?;
                self.ns_relays.push(child);
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line)?;
                if !line.starts_with("relay ready") {
                    bail!("the relay in {ns} did not start");
                }
            }
        }
        // The delaying relays of the root namespace.
        for i in 0..self.nodes {
            for port in [NODE_PORT, ECHO_PORT] {
                self.relays.push(Relay::start(
                    sock(virt(s, node_host(i)), port),
                    sock(real(s, node_host(i)), port),
                    self.one_way,
                )?);
            }
        }
        self.relays.push(Relay::start(
            sock(real(s, 1), DESIGNER_RELAY_PORT),
            self.designer_listen(),
            self.one_way,
        )?);
        self.relays.push(Relay::start(
            sock(real(s, 1), DESIGNER_LAST_RELAY_PORT),
            self.designer_last(),
            self.one_way,
        )?);
        Ok(())
    }

    /// How to start node `i` (inside its namespace, on its own address).
    pub fn launches(&self) -> Vec<NodeLaunch> {
        (0..self.nodes)
            .map(|i| NodeLaunch {
                prefix: ["ip", "netns", "exec"]
                    .iter()
                    .map(OsString::from)
                    .chain([OsString::from(ns_name(self.pid, i))])
                    .collect(),
                listen: sock(real(self.subnet, node_host(i)), NODE_PORT).to_string(),
                args: Vec::new(),
            })
            .collect()
    }

    /// The hops as the cascade must address them: through the relays.
    pub fn advertise(&self, hops: &[HopInfo]) -> Vec<HopInfo> {
        hops.iter()
            .enumerate()
            .map(|(i, h)| HopInfo {
                addr: sock(virt(self.subnet, node_host(i)), NODE_PORT),
                ..h.clone()
            })
            .collect()
    }

    /// Where the designer must listen for deliveries (its first end; its
    /// second, for the last hop, is on the next port).
    pub fn designer_listen(&self) -> SocketAddr {
        sock(virt(self.subnet, 1), DESIGNER_PORT)
    }

    /// The designer's second end (the last hop delivers there).
    fn designer_last(&self) -> SocketAddr {
        sock(virt(self.subnet, 1), DESIGNER_PORT + 1)
    }

    /// Where node `i`'s echo server is reached (through the same relay
    /// path as the node itself).
    fn echo_addr(&self, i: usize) -> SocketAddr {
        sock(virt(self.subnet, node_host(i)), ECHO_PORT)
    }

    /// Measures every designer→node path, and node 0's paths to node 1
    /// and to the designer's address, with one-byte round trips to echo
    /// servers at the far end. Call before the designer listens.
    pub fn measure(&self) -> anyhow::Result<MeasuredRtt> {
        let designer_node_ms = (0..self.nodes)
            .map(|i| relay::echo_rtt_ms(self.echo_addr(i), PROBES))
            .collect::<anyhow::Result<Vec<f64>>>()?;
        // A stand-in for the designer while node 0 probes its address.
        let stand_in = EchoServer::start(self.designer_listen())?;
        let mut targets = vec![self.designer_listen()];
        if self.nodes > 1 {
            targets.push(self.echo_addr(1));
        }
        let out = Command::new("ip")
            .args(["netns", "exec", &ns_name(self.pid, 0)])
            .arg(std::env::current_exe()?)
            .args(["bench", "probe", "--count", &PROBES.to_string()])
            .args(targets.iter().map(ToString::to_string))
            .stdin(Stdio::null())
            .output()
            .context("probing from node 0's namespace")?;
        drop(stand_in);
        if !out.status.success() {
            bail!(
                "probing from node 0's namespace: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let probed = |addr: SocketAddr| {
            text.lines().find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some("probe") && f.next() == Some(&addr.to_string()))
                    .then(|| f.next()?.parse::<f64>().ok())
                    .flatten()
            })
        };
        Ok(MeasuredRtt {
            designer_node_ms,
            node_node_ms: (self.nodes > 1)
                .then(|| probed(self.echo_addr(1)))
                .flatten(),
            node_designer_ms: probed(self.designer_listen()),
        })
    }
}

fn node_host(i: usize) -> u8 {
    // `create` allows at most 200 nodes: 10 + i ≤ 209.
    (10 + i.min(200)) as u8
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.relays.clear();
        for c in &mut self.ns_relays {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove(self.pid);
    }
}

/// For the signal handler: removes this process's namespaces and links.
pub fn cleanup_hook() {
    remove(std::process::id());
}

/// Removes the namespaces (stopping every process in them), bridge and
/// veths made by process `pid`; returns their names. Idempotent.
pub fn remove(pid: u32) -> Vec<String> {
    let mut removed = Vec::new();
    let ns_prefix = format!("{NS_PREFIX}{pid}-");
    for ns in namespaces() {
        if !ns.starts_with(&ns_prefix) {
            continue;
        }
        let pids = ip_output(&["netns", "pids", &ns]);
        for p in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", p]).status();
        }
        if ip(&["netns", "del", &ns]).is_ok() {
            removed.push(ns);
        }
    }
    for link in links() {
        if link_pid(&link) == Some(pid) && ip(&["link", "del", &link]).is_ok() {
            removed.push(link);
        }
    }
    removed
}

/// Removes what runs of `mixnn bench` that are no longer running left.
pub fn remove_stale() -> Vec<String> {
    let mut pids: Vec<u32> = namespaces()
        .iter()
        .filter_map(|ns| ns_pid(ns))
        .chain(links().iter().filter_map(|l| link_pid(l)))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .filter(|&p| p != std::process::id() && !is_mixnn_running(p))
        .flat_map(remove)
        .collect()
}

fn is_mixnn_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim() == "mixnn")
        .unwrap_or(false)
}

fn namespaces() -> Vec<String> {
    ip_output(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| ns_pid(n).is_some())
        .map(str::to_string)
        .collect()
}

/// The pid in `mixnn-<pid>-<i>`.
fn ns_pid(name: &str) -> Option<u32> {
    let (pid, i) = name.strip_prefix(NS_PREFIX)?.split_once('-')?;
    i.parse::<usize>().ok()?;
    pid.parse().ok()
}

fn links() -> Vec<String> {
    ip_output(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| {
            let name = l.split(':').nth(1)?.trim();
            // `mxvPnI@if3` names its peer after the `@`.
            let name = name.split('@').next()?;
            link_pid(name).map(|_| name.to_string())
        })
        .collect()
}

/// The pid in `mxb<pid>` or `mxv<pid>n<i>`.
fn link_pid(name: &str) -> Option<u32> {
    if let Some(rest) = name.strip_prefix(BRIDGE_PREFIX) {
        return rest.parse().ok();
    }
    let (pid, i) = name.strip_prefix(VETH_PREFIX)?.split_once('n')?;
    i.parse::<usize>().ok()?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_pid() {
        assert_eq!(ns_pid(&ns_name(4242, 3)), Some(4242));
        assert_eq!(ns_pid("mixnn-x-1"), None);
        assert_eq!(ns_pid("other"), None);
        assert_eq!(link_pid("mxb4242"), Some(4242));
        assert_eq!(link_pid("mxv4242n0"), Some(4242));
        assert_eq!(link_pid("mxvx"), None);
        assert_eq!(link_pid("eth0"), None);
    }

    #[test]
    fn addresses_are_in_private_subnets() {
        assert_eq!(real(7, node_host(0)).to_string(), "10.213.7.10");
        assert_eq!(virt(7, 1).to_string(), "10.214.7.1");
    }
}
