//! Cascades from a directory authority (paper §2.2): the designer fetches
//! the signed view, checks it against the directory keys it pins (k of N
//! when there are several), draws the hops at random weighted by their
//! history, hides dummy hops among the real stages, and takes replacements
//! for failed hops from the same directory, reporting the failure there.

use std::collections::HashSet;
use std::net::SocketAddr;

use mixnn_directory::ed25519_dalek::SigningKey;
use mixnn_directory::{
    select, sign_draw_request, sign_failure_report, unix_now, verify_quorum, Diversity,
    VerifiedView, ViewNode,
};
use mixnn_directory_client::DirectoryClient;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use mixnn_model::arith::ARITH_VERSION;

use crate::cascade::HopInfo;
use crate::error::DesignerError;
use crate::replacements::Replacements;

/// The directories a designer trusts.
#[derive(Debug, Clone)]
pub struct Directories {
    /// Their URLs (`http://host:port`).
    pub urls: Vec<String>,
    /// The directory keys the designer pins.
    pub pinned: Vec<[u8; 32]>,
    /// How many of them must list the same entry for a node.
    pub quorum: usize,
    /// The prefix rule of the draw: [`Diversity::Strict`] (no two hops in
    /// one /16), or `AllowSameSubnet` for local testing only.
    pub diversity: Diversity,
}

impl Directories {
    /// Fetches every directory's view and checks it: signed by a pinned
    /// key, not expired, and the same node list from at least `quorum` of
    /// them.
    pub fn view(&self) -> Result<VerifiedView, DesignerError> {
        let mut views = Vec::new();
        let mut errors = Vec::new();
        for url in &self.urls {
            match DirectoryClient::new(url).and_then(|c| c.view()) {
                Ok(v) => views.push(v),
                Err(e) => errors.push(format!("{url}: {e}")),
            }
        }
        let k = self.quorum.max(1);
        if views.len() < k {
            return Err(DesignerError::Quorum {
                answered: views.len(),
                asked: self.urls.len(),
                needed: k,
                errors: errors.join("; "),
            });
        }
        Ok(verify_quorum(&views, &self.pinned, k, unix_now())?)
    }
}

fn hop(node: &ViewNode) -> HopInfo {
    HopInfo {
        addr: node.descriptor.addr,
        onion: hex::encode(node.descriptor.onion),
        link: hex::encode(node.descriptor.link),
        arith: node.descriptor.arith,
    }
}

/// The listed nodes that compute this build's arithmetic: only they can
/// be drawn (a node of another arithmetic would be refused at init).
fn same_arith(nodes: &[ViewNode]) -> Vec<ViewNode> {
    nodes
        .iter()
        .filter(|n| n.descriptor.arith == ARITH_VERSION)
        .cloned()
        .collect()
}

/// A cascade drawn from a directory view.
#[derive(Debug, Clone)]
pub struct DrawnCascade {
    /// Every hop, in order (dummies included).
    pub hops: Vec<HopInfo>,
    /// Positions of the dummy hops.
    pub dummies: Vec<usize>,
    /// The nodes' identity keys, by hop.
    pub identities: Vec<[u8; 32]>,
}

/// Draws `real + dummies` distinct nodes from `view`, weighted by their
/// reliability, with the dummies at random positions, no two of one
/// family or (under [`Diversity::Strict`]) one /16; only nodes of this
/// build's arithmetic take part.
pub fn draw(
    view: &VerifiedView,
    real: usize,
    dummies: usize,
    diversity: Diversity,
    rng: &mut ChaCha20Rng,
) -> Result<DrawnCascade, DesignerError> {
    let s = select(&same_arith(&view.nodes), real, dummies, diversity, rng)?;
    Ok(DrawnCascade {
        hops: s.hops.iter().map(hop).collect(),
        identities: s.hops.iter().map(|n| n.descriptor.identity).collect(),
        dummies: s.dummy_positions.clone(),
    })
}

/// Replacements drawn from the directories; failures are reported there,
/// signed with the designer's key.
pub struct DirectoryReplacements {
    dirs: Directories,
    key: SigningKey,
    rng: ChaCha20Rng,
    failed: HashSet<SocketAddr>,
    identities: Vec<(SocketAddr, [u8; 32])>,
}

impl DirectoryReplacements {
    /// Replacements from `dirs`; `key` signs draw requests and failure
    /// reports; `known` maps the cascade's addresses to identity keys. The
    /// drawn nodes are recorded with every directory under `key` (a draw
    /// receipt: a directory takes failure reports only about nodes the
    /// reporter drew).
    pub fn new(dirs: Directories, key: SigningKey, seed: u64, known: &DrawnCascade) -> Self {
        record_draw(&dirs, &key, &known.identities);
        DirectoryReplacements {
            dirs,
            key,
            rng: ChaCha20Rng::seed_from_u64(seed ^ 0x7265_706c_6163_6521),
            failed: HashSet::new(),
            identities: known
                .hops
                .iter()
                .map(|h| h.addr)
                .zip(known.identities.iter().copied())
                .collect(),
        }
    }

    /// A designer key made for this run.
    pub fn ephemeral_key() -> SigningKey {
        let mut secret = [0u8; 32];
        rand_core::OsRng.fill_bytes(&mut secret);
        SigningKey::from_bytes(&secret)
    }
}

/// Sends a signed draw request for `nodes` to every directory (best
/// effort: a refusal only costs the right to report those nodes there).
fn record_draw(dirs: &Directories, key: &SigningKey, nodes: &[[u8; 32]]) {
    if nodes.is_empty() {
        return;
    }
    let request = match sign_draw_request(key, nodes, unix_now()) {
        Ok(r) => r,
        Err(e) => return tracing::warn!("draw request not signed: {e}"),
    };
    for url in &dirs.urls {
        match DirectoryClient::new(url).and_then(|c| c.draw(&request)) {
            Ok(_) => tracing::debug!(%url, "draw recorded"),
            Err(e) => {
                tracing::warn!(%url, "draw not recorded (failures cannot be reported there): {e}")
            }
        }
    }
}

impl Replacements for DirectoryReplacements {
    fn replace(
        &mut self,
        failed: &[HopInfo],
        in_use: &[HopInfo],
    ) -> Result<Vec<HopInfo>, DesignerError> {
        self.failed.extend(failed.iter().map(|h| h.addr));
        let view = self.dirs.view()?;
        let busy: HashSet<SocketAddr> = in_use.iter().map(|h| h.addr).collect();
        let candidates: Vec<ViewNode> = view
            .nodes
            .iter()
            .filter(|n| {
                n.descriptor.arith == ARITH_VERSION
                    && !busy.contains(&n.descriptor.addr)
                    && !self.failed.contains(&n.descriptor.addr)
            })
            .cloned()
            .collect();
        // Diversity against the hops kept as well: they stay in the pool as
        // already-drawn conflicts.
        let kept: Vec<&ViewNode> = view
            .nodes
            .iter()
            .filter(|n| busy.contains(&n.descriptor.addr))
            .collect();
        let candidates: Vec<ViewNode> = candidates
            .into_iter()
            .filter(|c| {
                kept.iter()
                    .all(|k| !self.dirs.diversity.conflict(&k.descriptor, &c.descriptor))
            })
            .collect();
        let s = select(
            &candidates,
            failed.len(),
            0,
            self.dirs.diversity,
            &mut self.rng,
        )
        .map_err(|e| DesignerError::NoReplacement {
            addr: failed.first().map_or(([0, 0, 0, 0], 0).into(), |h| h.addr),
            reason: e.to_string(),
        })?;
        for n in &s.hops {
            self.identities
                .push((n.descriptor.addr, n.descriptor.identity));
        }
        let drawn: Vec<[u8; 32]> = s.hops.iter().map(|n| n.descriptor.identity).collect();
        record_draw(&self.dirs, &self.key, &drawn);
        Ok(s.hops.iter().map(hop).collect())
    }

    fn report(&mut self, failed: &HopInfo, step: u64, reason: &str) {
        let Some((_, identity)) = self.identities.iter().find(|(a, _)| *a == failed.addr) else {
            return;
        };
        let report = match sign_failure_report(&self.key, *identity, step, reason, unix_now()) {
            Ok(r) => r,
            Err(e) => return tracing::warn!("failure report not signed: {e}"),
        };
        for url in &self.dirs.urls {
            match DirectoryClient::new(url).and_then(|c| c.report_failure(&report)) {
                Ok(_) => {
                    tracing::info!(%url, node = %mixnn_net::alias::peer(&failed.addr), "failure reported")
                }
                Err(e) => tracing::warn!(%url, "failure report refused: {e}"),
            }
        }
    }
}
