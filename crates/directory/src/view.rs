//! The directory's signed view of the live nodes, and its verification by
//! designers (one pinned directory, or k of N).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::descriptor::{Descriptor, SignedDescriptor, CLOCK_SKEW_SECS};
use crate::error::{DirectoryError, Result};
use crate::keys::DirectoryKeys;
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
    /// The node list as `(identity, addr)` pairs, sorted: what k-of-N
    /// directories must agree on.
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
    /// valid, and no identity key or address listed twice.
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
            nodes.push(ViewNode {
                descriptor,
                signed: entry.descriptor,
                uptime_fraction: entry.uptime_fraction,
                missed_heartbeats: entry.missed_heartbeats,
                recent_failures: entry.recent_failures,
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

/// Verifies views from several directories and requires the same node list
/// (identity keys and addresses) signed by at least `k` distinct pinned
/// directories. Views that fail [`SignedView::verify`] are ignored.
///
/// If several node lists reach `k`, the one with the most signers wins.
/// Returns the first view of that list in `views`' order; its reliability
/// figures are that directory's.
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
    type NodeSet = Vec<([u8; 32], SocketAddr)>;
    let mut groups: BTreeMap<NodeSet, (BTreeSet<[u8; 32]>, VerifiedView)> = BTreeMap::new();
    for view in views {
        let verified = match view.verify(pinned, now) {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "view left out of the quorum");
                continue;
            }
        };
        let (signers, _) = groups
            .entry(verified.node_set())
            .or_insert_with(|| (BTreeSet::new(), verified.clone()));
        signers.insert(verified.directory);
    }
    let agreeing = groups.values().map(|(s, _)| s.len()).max().unwrap_or(0);
    groups
        .into_values()
        .filter(|(signers, _)| signers.len() >= k)
        .max_by_key(|(signers, _)| signers.len())
        .map(|(_, view)| view)
        .ok_or(DirectoryError::QuorumNotMet {
            agreeing,
            required: k,
        })
}
