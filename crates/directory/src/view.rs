//! The directory's signed view of the live nodes, and its verification by
//! designers (one pinned directory, or k of N).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::descriptor::{Descriptor, SignedDescriptor, CLOCK_SKEW_SECS};
use crate::error::{DirectoryError, Result};
use crate::keys::DirectoryKeys;
use crate::select::weight;
use crate::signed::{self, hex32, hex64, VIEW_DOMAIN};

/// One node in a view: its signed descriptor and the directory's
/// reliability figures for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// The node's descriptor as the node signed it.
    pub descriptor: SignedDescriptor,
    /// Fraction of the time since first registration the node was up, [0, 1].
    pub uptime_fraction: f64,
    /// Heartbeats expected but not received.
    pub missed_heartbeats: u64,
    /// Failure reports within the directory's failure window.
    pub recent_failures: u64,
    /// The capped, decaying penalty of those reports, in halvings of the
    /// weight (`0..=MAX_PENALTY`; see [`crate::weight`]).
    #[serde(default)]
    pub report_penalty: f64,
}

/// What a directory signs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct View {
    /// The signing directory's public key.
    #[serde(with = "hex32")]
    pub directory: [u8; 32],
    /// When it was issued (directory clock, unix s).
    pub issued: u64,
    /// Last second at which it may be used.
    pub valid_until: u64,
    /// Live nodes, ordered by identity key.
    pub nodes: Vec<NodeEntry>,
}

/// A view with its directory's signature, as served by `GET /v1/view`.
///
/// JSON: `{"view": {...}, "signature": hex}`; the signature covers
/// `b"mixnn-view-v1\0" ‖` the exact bytes of the `view` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedView {
    view: Box<RawValue>,
    #[serde(with = "hex64")]
    signature: [u8; 64],
}

/// A verified node of a [`VerifiedView`].
#[derive(Debug, Clone, PartialEq)]
pub struct ViewNode {
    /// The verified descriptor.
    pub descriptor: Descriptor,
    /// The same, as signed (to pass on).
    pub signed: SignedDescriptor,
    /// See [`NodeEntry::uptime_fraction`].
    pub uptime_fraction: f64,
    /// See [`NodeEntry::missed_heartbeats`].
    pub missed_heartbeats: u64,
    /// See [`NodeEntry::recent_failures`].
    pub recent_failures: u64,
    /// See [`NodeEntry::report_penalty`].
    pub report_penalty: f64,
    /// The selection weight: [`crate::weight`] of this directory's
    /// figures, or the median of the agreeing directories' weights in a
    /// k-of-N view ([`verify_quorum`]). Read it with [`ViewNode::weight`].
    pub weight: f64,
}

/// A view whose signature, signer, expiry and every descriptor were checked.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedView {
    /// The directory that signed it.
    pub directory: [u8; 32],
    /// When it was issued.
    pub issued: u64,
    /// When it expires.
    pub valid_until: u64,
    /// Its nodes, in the view's order.
    pub nodes: Vec<ViewNode>,
}

impl VerifiedView {
    /// The node list as `(identity, addr)` pairs, sorted.
    pub fn node_set(&self) -> Vec<([u8; 32], SocketAddr)> {
        let mut set: Vec<_> = self
            .nodes
            .iter()
            .map(|n| (n.descriptor.identity, n.descriptor.addr))
            .collect();
        set.sort();
        set
    }
}

impl SignedView {
    /// Signs `view` with the directory's key (directory side).
    pub fn sign(keys: &DirectoryKeys, view: &View) -> Result<Self> {
        let (view, signature) = signed::sign_json(keys.signing(), VIEW_DOMAIN, view)?;
        Ok(Self { view, signature })
    }

    /// Verifies the view for a designer that pins the directory keys
    /// `pinned`: the signer must be pinned, the signature valid, the view
    /// not expired (`now > valid_until`) nor issued more than
    /// [`CLOCK_SKEW_SECS`] ahead of `now`, every node descriptor's signature
    /// valid, and no identity key, address, link key or onion key listed
    /// twice.
    pub fn verify(&self, pinned: &[[u8; 32]], now: u64) -> Result<VerifiedView> {
        let view: View = signed::parse_json("view", &self.view)?;
        if !pinned.contains(&view.directory) {
            return Err(DirectoryError::UnknownDirectory {
                key: hex::encode(view.directory),
            });
        }
        signed::verify_json(
            &view.directory,
            "directory",
            "view",
            VIEW_DOMAIN,
            &self.view,
            &self.signature,
        )?;
        if now > view.valid_until {
            return Err(DirectoryError::ViewExpired {
                valid_until: view.valid_until,
                now,
            });
        }
        if view.issued > now.saturating_add(CLOCK_SKEW_SECS) {
            return Err(DirectoryError::FromFuture {
                what: "view",
                stamped: view.issued,
                now,
            });
        }
        let mut identities = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        let mut keys = BTreeSet::new();
        let mut nodes = Vec::with_capacity(view.nodes.len());
        for entry in view.nodes {
            let descriptor = entry.descriptor.verify_signature()?;
            if !identities.insert(descriptor.identity) {
                return Err(DirectoryError::DuplicateInView {
                    what: "identity",
                    value: hex::encode(descriptor.identity),
                });
            }
            if !addrs.insert(descriptor.addr) {
                return Err(DirectoryError::DuplicateInView {
                    what: "address",
                    value: descriptor.addr.to_string(),
                });
            }
            for (what, key) in [
                ("link key", descriptor.link),
                ("onion key", descriptor.onion),
            ] {
                if !keys.insert((what, key)) {
                    return Err(DirectoryError::DuplicateInView {
                        what,
                        value: hex::encode(key),
                    });
                }
            }
            nodes.push(ViewNode {
                weight: weight(entry.uptime_fraction, entry.report_penalty),
                descriptor,
                signed: entry.descriptor,
                uptime_fraction: entry.uptime_fraction,
                missed_heartbeats: entry.missed_heartbeats,
                recent_failures: entry.recent_failures,
                report_penalty: entry.report_penalty,
            });
        }
        Ok(VerifiedView {
            directory: view.directory,
            issued: view.issued,
            valid_until: view.valid_until,
            nodes,
        })
    }

    /// The exact signed JSON of the view (without the domain prefix).
    pub fn view_json(&self) -> &str {
        self.view.get()
    }
}

/// What k-of-N directories must agree on about a node: everything a
/// designer uses to reach it and to draw it (address, every key, protocol
/// and arithmetic versions, family), not its capabilities or `published`.
type EntryKey = (
    SocketAddr,
    [u8; 32],
    [u8; 32],
    [u8; 32],
    u32,
    u32,
    Vec<[u8; 32]>,
);

fn entry_key(d: &Descriptor) -> EntryKey {
    let mut family = d.family.clone();
    family.sort_unstable();
    (
        d.addr, d.identity, d.onion, d.link, d.version, d.arith, family,
    )
}

/// Verifies views from several directories and keeps, entry by entry, what
/// at least `k` distinct pinned directories agree on. Views that fail
/// [`SignedView::verify`] are ignored; a second view from the same
/// directory is ignored too.
///
/// A node is in the result only if at least `k` directories list the very
/// same entry for it (address, identity, onion and link keys, versions,
/// family; see `EntryKey`); should two different entries for one identity
/// both reach `k`, the one more directories list wins, and a tie leaves
/// the node out. Its weight ([`ViewNode::weight`]) is the median of those
/// directories' weights (the lower median for an even count), so neither
/// its descriptor nor its weight comes from any single directory: fewer
/// than `k` liars change neither which entry is used nor, while the honest
/// ones are the majority of the agreeing set, move the weight outside the
/// honest directories' range. The other figures (uptime, failures) are
/// those of the directory whose weight is the median; the descriptor is
/// the most recently published of the agreeing ones.
///
/// The result's `directory` is the first agreeing view's signer, `issued`
/// the latest and `valid_until` the earliest of the views used. Fails with
/// [`DirectoryError::QuorumNotMet`] if fewer than `k` distinct pinned
/// directories sent a valid view.
pub fn verify_quorum(
    views: &[SignedView],
    pinned: &[[u8; 32]],
    k: usize,
    now: u64,
) -> Result<VerifiedView> {
    if k == 0 {
        return Err(DirectoryError::InvalidField {
            field: "k",
            reason: "a quorum needs at least one directory".into(),
        });
    }
    let mut verified: Vec<VerifiedView> = Vec::new();
    for view in views {
        match view.verify(pinned, now) {
            Ok(v) if verified.iter().all(|w| w.directory != v.directory) => verified.push(v),
            Ok(v) => tracing::debug!(
                directory = %hex::encode(v.directory),
                "second view of one directory left out of the quorum"
            ),
            Err(e) => tracing::debug!(error = %e, "view left out of the quorum"),
        }
    }
    if verified.len() < k {
        return Err(DirectoryError::QuorumNotMet {
            agreeing: verified.len(),
            required: k,
        });
    }
    // identity -> entry -> the agreeing directories' nodes.
    let mut by_identity: BTreeMap<[u8; 32], BTreeMap<EntryKey, Vec<&ViewNode>>> = BTreeMap::new();
    for view in &verified {
        for node in &view.nodes {
            by_identity
                .entry(node.descriptor.identity)
                .or_default()
                .entry(entry_key(&node.descriptor))
                .or_default()
                .push(node);
        }
    }
    let mut nodes = Vec::new();
    for (identity, entries) in by_identity {
        let mut ranked: Vec<(&EntryKey, &Vec<&ViewNode>)> =
            entries.iter().filter(|(_, v)| v.len() >= k).collect();
        ranked.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        let agreeing = match ranked.as_slice() {
            [] => continue,
            [(_, a), (_, b), ..] if a.len() == b.len() => {
                tracing::warn!(
                    node = %hex::encode(identity),
                    "directories disagree evenly about this node; left out"
                );
                continue;
            }
            [(_, a), ..] => a,
        };
        let mut by_weight: Vec<&ViewNode> = agreeing.to_vec();
        by_weight.sort_by(|a, b| a.weight().total_cmp(&b.weight()));
        let median = by_weight[(by_weight.len() - 1) / 2];
        let newest = agreeing
            .iter()
            .max_by_key(|n| n.descriptor.published)
            .unwrap_or(&median);
        nodes.push(ViewNode {
            descriptor: newest.descriptor.clone(),
            signed: newest.signed.clone(),
            weight: median.weight(),
            ..median.clone()
        });
    }
    Ok(VerifiedView {
        directory: verified[0].directory,
        issued: verified.iter().map(|v| v.issued).max().unwrap_or(0),
        valid_until: verified.iter().map(|v| v.valid_until).min().unwrap_or(0),
        nodes,
    })
}
