//! The directory's SQLite store: registered nodes, their heartbeat history,
//! and the failure reports designers sent about them.
//!
//! (Over 600 lines: every SQL statement of the directory lives
//! here, next to the schema and its migrations, so no query is written
//! anywhere else.)
//!
//! Every write verifies its signed input first and runs in one transaction;
//! the database runs in WAL mode, so a restart (reopening the file) finds
//! everything that was committed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use mixnn_directory::api::{FailureOutcome, Registration};
use mixnn_directory::{
    listing_prefix, non_public, Counters, Descriptor, DirectoryError, FailureRecord, History,
    NodeRecord, Result, SignedDescriptor, SignedDrawRequest, SignedFailureReport, SignedHeartbeat,
    MAX_PENALTY, PREFIX_CAP, REPORTED_PER_PREFIX, REPORTER_CAP,
};

use crate::config::{Addresses, DirectoryConfig};

/// SQLite errors as [`DirectoryError::Database`].
trait Db<T> {
    fn db(self) -> Result<T>;
}

impl<T> Db<T> for rusqlite::Result<T> {
    fn db(self) -> Result<T> {
        self.map_err(|e| DirectoryError::Database {
            reason: e.to_string(),
        })
    }
}

const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS nodes (
    identity   TEXT PRIMARY KEY,           -- Ed25519 identity key, hex
    addr       TEXT NOT NULL UNIQUE,       -- socket address
    published  INTEGER NOT NULL,           -- descriptor's published (unix s)
    descriptor TEXT NOT NULL,              -- the signed descriptor JSON, verbatim
    signature  TEXT NOT NULL,              -- hex
    first_seen INTEGER NOT NULL,           -- first registration (directory clock)
    last_seen  INTEGER NOT NULL,           -- last registration or heartbeat
    prefix     TEXT NOT NULL DEFAULT '',   -- the address's IPv4 /24 or IPv6 /29
    proven_at  INTEGER,                    -- last successful probe; NULL: not listed
    link       TEXT NOT NULL DEFAULT '',   -- the descriptor's link key, hex
    onion      TEXT NOT NULL DEFAULT ''    -- the descriptor's onion key, hex
);
CREATE INDEX IF NOT EXISTS nodes_by_link ON nodes (link);
CREATE INDEX IF NOT EXISTS nodes_by_onion ON nodes (onion);
CREATE TABLE IF NOT EXISTS history (
    identity       TEXT PRIMARY KEY REFERENCES nodes(identity) ON DELETE CASCADE,
    heartbeats     INTEGER NOT NULL DEFAULT 0,
    last_heartbeat INTEGER,                -- node's timestamp of the last accepted one
    uptime_secs    INTEGER NOT NULL DEFAULT 0,
    failures       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS failures (
    id        INTEGER PRIMARY KEY,
    identity  TEXT NOT NULL REFERENCES nodes(identity) ON DELETE CASCADE,
    reporter  TEXT NOT NULL,
    step      INTEGER NOT NULL,
    reason    TEXT NOT NULL,
    timestamp INTEGER NOT NULL,            -- reporter's clock
    received  INTEGER NOT NULL,            -- directory's clock
    signature TEXT NOT NULL,
    prefix    TEXT NOT NULL DEFAULT '',    -- where the report came from: IPv4 /24 or IPv6 /29
    UNIQUE (identity, reporter, step)
);
CREATE INDEX IF NOT EXISTS failures_by_node ON failures (identity, received);
CREATE INDEX IF NOT EXISTS failures_by_prefix ON failures (prefix, received);
CREATE TABLE IF NOT EXISTS draws (
    designer  TEXT NOT NULL,               -- the designer's key, hex
    identity  TEXT NOT NULL REFERENCES nodes(identity) ON DELETE CASCADE,
    received  INTEGER NOT NULL,            -- directory's clock
    prefix    TEXT NOT NULL                -- the requester's IPv4 /24 or IPv6 /29
);
CREATE INDEX IF NOT EXISTS draws_by_designer ON draws (designer, identity, received);
CREATE INDEX IF NOT EXISTS draws_by_prefix ON draws (prefix, received);
";

/// Schema 1 had no prefixes, proofs or draws: add the columns (every node
/// starts unproven, so it is listed again only after a probe).
const MIGRATE_1_TO_2: &str = "
ALTER TABLE nodes ADD COLUMN prefix TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN proven_at INTEGER;
";

/// Schema 2 had no key columns (filled from the stored descriptors) and
/// no report prefixes (old reports share the empty one). IPv6 listing
/// prefixes became /29s.
const MIGRATE_2_TO_3: &str = "
ALTER TABLE nodes ADD COLUMN link TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN onion TEXT NOT NULL DEFAULT '';
ALTER TABLE failures ADD COLUMN prefix TEXT NOT NULL DEFAULT '';
";

/// The SQLite store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<Self> {
        Self::init(Connection::open(path).db()?)
    }

    /// A throwaway in-memory database (tests).
    pub fn open_in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory().db()?)
    }

    fn init(conn: Connection) -> Result<Self> {
        conn.busy_timeout(std::time::Duration::from_secs(5)).db()?;
        let _mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .db()?;
        conn.pragma_update(None, "synchronous", "NORMAL").db()?;
        conn.pragma_update(None, "foreign_keys", "ON").db()?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .db()?;
        if version > SCHEMA_VERSION {
            return Err(DirectoryError::Database {
                reason: format!(
                    "schema version {version} is newer than this build's {SCHEMA_VERSION}"
                ),
            });
        }
        if version == 1 {
            conn.execute_batch(MIGRATE_1_TO_2).db()?;
        }
        if (1..=2).contains(&version) {
            conn.execute_batch(MIGRATE_2_TO_3).db()?;
            let rows: Vec<(String, String, String)> = conn
                .prepare("SELECT identity, descriptor, signature FROM nodes")
                .db()?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .db()?
                .collect::<rusqlite::Result<_>>()
                .db()?;
            for (identity, json, sig) in rows {
                let Ok(d) = stored_descriptor(&json, &sig).and_then(|s| s.verify_signature())
                else {
                    continue;
                };
                conn.execute(
                    "UPDATE nodes SET prefix = ?2, link = ?3, onion = ?4 WHERE identity = ?1",
                    params![
                        identity,
                        listing_prefix(d.addr.ip()),
                        hex::encode(d.link),
                        hex::encode(d.onion)
                    ],
                )
                .db()?;
            }
        }
        conn.execute_batch(SCHEMA).db()?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .db()?;
        Ok(Self { conn })
    }

    /// Checks a registration before its probe: the descriptor verifies
    /// ([`SignedDescriptor::verify`] with `config.max_descriptor_age`), is
    /// not older than the registered one of its identity (the very same
    /// may come again), and its prefix has room (the same check runs again
    /// in [`Store::admit`]). Returns the descriptor, and whether it is the
    /// registered one, still proven within `config.reprobe_interval` (then
    /// no probe is needed).
    pub fn check_registration(
        &self,
        signed: &SignedDescriptor,
        now: u64,
        config: &DirectoryConfig,
    ) -> Result<(Descriptor, bool)> {
        let d = signed.verify(now, config.max_descriptor_age)?;
        let identity = hex::encode(d.identity);
        let existing: Option<(i64, String, String, Option<i64>)> = self
            .conn
            .query_row(
                "SELECT published, descriptor, signature, proven_at FROM nodes WHERE identity = ?1",
                [&identity],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .db()?;
        let mut fresh = false;
        if let Some((current, json, sig, proven_at)) = existing {
            let published = to_i64("published", d.published)?;
            let same = json == signed.descriptor_json() && sig == hex::encode(signed.signature());
            if published < current || (published == current && !same) {
                return Err(DirectoryError::NotNewer {
                    published: d.published,
                    current: from_i64(current),
                });
            }
            fresh = same
                && proven_at
                    .map(from_i64)
                    .is_some_and(|p| p.saturating_add(config.reprobe_interval) >= now);
        }
        check_public(&d, config)?;
        check_keys(&self.conn, &d, now, config)?;
        check_prefix(&self.conn, &d, config)?;
        Ok((d, fresh))
    }

    /// Lists a descriptor whose node the directory has just proven at its
    /// address (a probe that passed at `now`). Runs the checks of
    /// [`Store::check_registration`] again, forgets nodes not heard from
    /// within `config.expiry`, and takes the address from any other
    /// identity holding it: the probe just reached this node there, so a
    /// squatter, or the address's earlier holder, loses it.
    pub fn admit(
        &mut self,
        signed: &SignedDescriptor,
        now: u64,
        config: &DirectoryConfig,
    ) -> Result<Registration> {
        let d = signed.verify(now, config.max_descriptor_age)?;
        let identity = hex::encode(d.identity);
        let addr = d.addr.to_string();
        let prefix = listing_prefix(d.addr.ip());
        let signature = hex::encode(signed.signature());
        let now_i = to_i64("now", now)?;
        let tx = self.conn.transaction().db()?;
        expire(&tx, now, config)?;
        let taken = tx
            .execute(
                "DELETE FROM nodes WHERE addr = ?1 AND identity != ?2",
                params![addr, identity],
            )
            .db()?;
        if taken > 0 {
            tracing::warn!(%addr, node = %identity, "address taken back by the node proven there");
        }
        check_public(&d, config)?;
        check_keys(&tx, &d, now, config)?;
        check_prefix(&tx, &d, config)?;
        let existing: Option<(i64, String, String)> = tx
            .query_row(
                "SELECT published, descriptor, signature FROM nodes WHERE identity = ?1",
                [&identity],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .db()?;
        let published = to_i64("published", d.published)?;
        let outcome = match existing {
            None => {
                tx.execute(
                    "INSERT INTO nodes (identity, addr, published, descriptor, signature, first_seen, last_seen, prefix, proven_at, link, onion)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?6, ?8, ?9)",
                    params![identity, addr, published, signed.descriptor_json(), signature, now_i, prefix,
                            hex::encode(d.link), hex::encode(d.onion)],
                ).db()?;
                tx.execute("INSERT INTO history (identity) VALUES (?1)", [&identity])
                    .db()?;
                Registration::New
            }
            Some((current, json, sig)) => {
                if published < current
                    || (published == current
                        && (json != signed.descriptor_json() || sig != signature))
                {
                    return Err(DirectoryError::NotNewer {
                        published: d.published,
                        current: from_i64(current),
                    });
                }
                let outcome = if published == current {
                    Registration::Unchanged
                } else {
                    Registration::Updated
                };
                tx.execute(
                    "UPDATE nodes SET addr = ?2, published = ?3, descriptor = ?4, signature = ?5, last_seen = ?6,
                            prefix = ?7, proven_at = ?6, link = ?8, onion = ?9
                     WHERE identity = ?1",
                    params![identity, addr, published, signed.descriptor_json(), signature, now_i, prefix,
                            hex::encode(d.link), hex::encode(d.onion)],
                ).db()?;
                outcome
            }
        };
        tx.commit().db()?;
        tracing::debug!(?outcome, "descriptor registered");
        Ok(outcome)
    }

    /// Records the outcome of a periodic probe of a registered node:
    /// `true` lists it again (if its prefix has room), `false` unlists it
    /// until a probe passes.
    pub fn record_probe(
        &mut self,
        d: &Descriptor,
        passed: bool,
        now: u64,
        config: &DirectoryConfig,
    ) -> Result<()> {
        let identity = hex::encode(d.identity);
        if passed {
            if check_prefix(&self.conn, d, config).is_err() {
                return Ok(());
            }
            self.conn
                .execute(
                    "UPDATE nodes SET proven_at = ?2 WHERE identity = ?1",
                    params![identity, to_i64("now", now)?],
                )
                .db()?;
        } else {
            self.conn
                .execute(
                    "UPDATE nodes SET proven_at = NULL WHERE identity = ?1",
                    [&identity],
                )
                .db()?;
        }
        Ok(())
    }

    /// The nodes to probe again at `now`: heard from within
    /// `config.live_window` and not proven within `config.reprobe_interval`.
    /// Nodes not heard from within `config.expiry` are forgotten first.
    pub fn due_for_probe(&mut self, now: u64, config: &DirectoryConfig) -> Result<Vec<Descriptor>> {
        let tx = self.conn.transaction().db()?;
        expire(&tx, now, config)?;
        tx.commit().db()?;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT descriptor, signature FROM nodes
                 WHERE last_seen >= ?1 AND (proven_at IS NULL OR proven_at <= ?2)
                 ORDER BY proven_at ASC, identity ASC",
            )
            .db()?;
        let rows = stmt
            .query_map(
                params![
                    to_i64("now", now.saturating_sub(config.live_window))?,
                    to_i64("now", now.saturating_sub(config.reprobe_interval))?
                ],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
            )
            .db()?;
        let mut out = Vec::new();
        for row in rows {
            let (json, sig) = row.db()?;
            if let Ok(d) = stored_descriptor(&json, &sig).and_then(|s| s.verify_signature()) {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Records a designer's draw: every listed node of the request, for
    /// the designer's key, at most `config.max_draws_per_prefix` requests
    /// per hour from the requester's prefix. Returns the recorded nodes.
    pub fn record_draw(
        &mut self,
        signed: &SignedDrawRequest,
        requester: IpAddr,
        now: u64,
        config: &DirectoryConfig,
    ) -> Result<Vec<[u8; 32]>> {
        let request = signed.verify(now, config.max_report_age)?;
        let prefix = listing_prefix(requester);
        let designer = hex::encode(request.designer);
        let now_i = to_i64("now", now)?;
        let tx = self.conn.transaction().db()?;
        let recent: i64 = tx
            .query_row(
                "SELECT COUNT(DISTINCT received || designer) FROM draws WHERE prefix = ?1 AND received > ?2",
                params![prefix, to_i64("now", now.saturating_sub(3600))?],
                |r| r.get(0),
            )
            .db()?;
        if from_i64(recent) >= config.max_draws_per_prefix {
            return Err(DirectoryError::RateLimited {
                what: "draw requests",
                prefix,
            });
        }
        let listed_since = to_i64("now", now.saturating_sub(config.proof_ttl))?;
        let mut recorded = Vec::new();
        for node in &request.nodes {
            let id = hex::encode(node);
            let listed = tx
                .query_row(
                    "SELECT 1 FROM nodes WHERE identity = ?1 AND proven_at >= ?2",
                    params![id, listed_since],
                    |_| Ok(()),
                )
                .optional()
                .db()?
                .is_some();
            if listed && !recorded.contains(node) {
                tx.execute(
                    "INSERT INTO draws (designer, identity, received, prefix) VALUES (?1, ?2, ?3, ?4)",
                    params![designer, id, now_i, prefix],
                )
                .db()?;
                recorded.push(*node);
            }
        }
        tx.execute(
            "DELETE FROM draws WHERE received < ?1",
            [to_i64(
                "now",
                now.saturating_sub(config.draw_window.max(3600)),
            )?],
        )
        .db()?;
        tx.commit().db()?;
        Ok(recorded)
    }

    /// Verifies and records a heartbeat: the node must be registered and the
    /// timestamp newer than its last heartbeat. The gap since the previous
    /// heartbeat (or the first registration) counts as uptime if it is at
    /// most twice `config.heartbeat_interval`.
    pub fn heartbeat(
        &mut self,
        signed: &SignedHeartbeat,
        now: u64,
        config: &DirectoryConfig,
    ) -> Result<()> {
        let hb = signed.verify(now, config.max_heartbeat_age)?;
        let identity = hex::encode(hb.identity);
        let tx = self.conn.transaction().db()?;
        let row: Option<(Option<i64>, i64)> = tx
            .query_row(
                "SELECT h.last_heartbeat, n.first_seen FROM history h JOIN nodes n USING (identity)
                 WHERE identity = ?1",
                [&identity],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .db()?;
        let Some((last, first_seen)) = row else {
            return Err(DirectoryError::UnknownNode { identity });
        };
        if let Some(last) = last.map(from_i64).filter(|&l| hb.timestamp <= l) {
            return Err(DirectoryError::Replayed {
                stamped: hb.timestamp,
                last,
            });
        }
        let previous = last.map_or(from_i64(first_seen), from_i64);
        let gap = hb.timestamp.saturating_sub(previous);
        let credited = if gap <= config.heartbeat_interval.saturating_mul(2) {
            gap
        } else {
            0
        };
        tx.execute(
            "UPDATE history SET heartbeats = heartbeats + 1, last_heartbeat = ?2,
                    uptime_secs = uptime_secs + ?3 WHERE identity = ?1",
            params![
                identity,
                to_i64("timestamp", hb.timestamp)?,
                to_i64("gap", credited)?
            ],
        )
        .db()?;
        tx.execute(
            "UPDATE nodes SET last_seen = ?2 WHERE identity = ?1",
            params![identity, to_i64("now", now)?],
        )
        .db()?;
        tx.commit().db()?;
        Ok(())
    }

    /// Verifies and stores a failure report about a registered node. The
    /// reporter must be an operator-admitted key
    /// (`config.admitted_reporters`) or have drawn the node within
    /// `config.draw_window` ([`Store::record_draw`]).
    ///
    /// `source` is the address the report came from (`None`: a caller
    /// inside the directory's process); at most
    /// `config.max_reports_per_prefix` are accepted per hour from one
    /// IPv4 /24 or IPv6 /29, and [`Store::penalties`] caps what one such
    /// prefix can do.
    pub fn report_failure(
        &mut self,
        signed: &SignedFailureReport,
        source: Option<IpAddr>,
        now: u64,
        config: &DirectoryConfig,
    ) -> Result<FailureOutcome> {
        let report = signed.verify(now, config.max_report_age)?;
        let identity = hex::encode(report.node);
        let prefix = source.map(listing_prefix).unwrap_or_default();
        let tx = self.conn.transaction().db()?;
        if !node_exists(&tx, &identity)? {
            return Err(DirectoryError::UnknownNode { identity });
        }
        if source.is_some() {
            let recent: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM failures WHERE prefix = ?1 AND received > ?2",
                    params![prefix, to_i64("now", now.saturating_sub(3600))?],
                    |r| r.get(0),
                )
                .db()?;
            if from_i64(recent) >= config.max_reports_per_prefix {
                return Err(DirectoryError::RateLimited {
                    what: "failure reports",
                    prefix,
                });
            }
        }
        if !config.admitted_reporters.contains(&report.reporter) {
            let drawn = tx
                .query_row(
                    "SELECT 1 FROM draws WHERE designer = ?1 AND identity = ?2 AND received >= ?3",
                    params![
                        hex::encode(report.reporter),
                        identity,
                        to_i64("now", now.saturating_sub(config.draw_window))?
                    ],
                    |_| Ok(()),
                )
                .optional()
                .db()?
                .is_some();
            if !drawn {
                return Err(DirectoryError::NotDrawn {
                    reporter: hex::encode(report.reporter),
                    node: identity,
                });
            }
        }
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO failures (identity, reporter, step, reason, timestamp, received, signature, prefix)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                identity,
                hex::encode(report.reporter),
                to_i64("step", report.step)?,
                report.reason,
                to_i64("timestamp", report.timestamp)?,
                to_i64("now", now)?,
                hex::encode(signed.signature()),
                prefix,
            ],
        ).db()?;
        if inserted == 1 {
            tx.execute(
                "UPDATE history SET failures = failures + 1 WHERE identity = ?1",
                [&identity],
            )
            .db()?;
        }
        tx.commit().db()?;
        Ok(if inserted == 1 {
            FailureOutcome::Recorded
        } else {
            FailureOutcome::Duplicate
        })
    }

    /// One node's descriptor, history and latest failure reports.
    pub fn node(
        &self,
        identity: &[u8; 32],
        now: u64,
        config: &DirectoryConfig,
    ) -> Result<NodeRecord> {
        let id = hex::encode(identity);
        let mut rows = self.rows(Some(&id), 0, now, config)?;
        let Some((descriptor, history)) = rows.pop() else {
            return Err(DirectoryError::UnknownNode { identity: id });
        };
        let mut stmt = self
            .conn
            .prepare(
                "SELECT reporter, step, reason, timestamp FROM failures WHERE identity = ?1
             ORDER BY received DESC, id DESC LIMIT 20",
            )
            .db()?;
        let recent_reports = stmt
            .query_map([&id], |r| {
                Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .db()?
            .map(|row| {
                let (reporter, step, reason, timestamp) = row.db()?;
                Ok(FailureRecord {
                    reporter: mixnn_directory::parse_key_hex("stored reporter key", &reporter)?,
                    step: from_i64(step),
                    reason,
                    timestamp: from_i64(timestamp),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(NodeRecord {
            descriptor,
            history,
            recent_reports,
        })
    }

    /// Every listed node: seen (registered or heartbeating) within
    /// `config.live_window` of `now` and proven within `config.proof_ttl`,
    /// ordered by identity key, with its report penalty
    /// ([`Store::penalties`]).
    pub fn live_nodes(
        &self,
        now: u64,
        config: &DirectoryConfig,
    ) -> Result<Vec<(SignedDescriptor, History, f64)>> {
        let penalties = self.penalties(now, config)?;
        let rows = self.rows(None, now.saturating_sub(config.live_window), now, config)?;
        let proven = self.proven_since(now.saturating_sub(config.proof_ttl))?;
        Ok(rows
            .into_iter()
            .filter(|(d, _)| {
                d.verify_signature()
                    .is_ok_and(|d| proven.contains(&hex::encode(d.identity)))
            })
            .map(|(d, h)| {
                let p = d
                    .verify_signature()
                    .ok()
                    .and_then(|v| penalties.get(&hex::encode(v.identity)).copied())
                    .unwrap_or(0.0);
                (d, h, p)
            })
            .collect())
    }

    fn proven_since(&self, since: u64) -> Result<std::collections::HashSet<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT identity FROM nodes WHERE proven_at >= ?1")
            .db()?;
        let rows = stmt
            .query_map([to_i64("now", since)?], |r| r.get::<_, String>(0))
            .db()?;
        rows.map(|r| r.db()).collect()
    }

    /// Each reported node's penalty (halvings of its weight), from its
    /// reports within `config.failure_window`, each worth
    /// `0.5 · 2^(−age / report_half_life)`:
    ///
    /// * of one reporter key about one node, only its two newest reports
    ///   count ([`REPORTER_CAP`]: at most one halving);
    /// * of the reporters of one source prefix (the IPv4 /24 or IPv6 /29
    ///   the reports came from) about one node, again only the two newest
    ///   count ([`PREFIX_CAP`]: at most one halving), so many keys from one
    ///   network weigh no more than one;
    /// * one source prefix penalises only the [`REPORTED_PER_PREFIX`]
    ///   nodes it reported most recently;
    /// * summed over prefixes, capped at [`MAX_PENALTY`].
    ///
    /// So the reports from one /24 halve at most 4 nodes' weight at a
    /// time, and a node reaches weight/8 only with reports from three
    /// /24s; a report's effect halves every half-life and ends with the
    /// window.
    pub fn penalties(&self, now: u64, config: &DirectoryConfig) -> Result<HashMap<String, f64>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT identity, reporter, prefix, received FROM failures WHERE received >= ?1",
            )
            .db()?;
        let rows = stmt
            .query_map(
                [to_i64("now", now.saturating_sub(config.failure_window))?],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                },
            )
            .db()?;
        let half_life = config.report_half_life.max(1) as f64;
        // Per (node, reporter): its reports, of which only the two newest
        // count.
        let mut per_reporter: HashMap<(String, String), Vec<Counted>> = HashMap::new();
        for row in rows {
            let (node, reporter, prefix, received) = row.db()?;
            let received = from_i64(received);
            let age = now.saturating_sub(received) as f64;
            per_reporter.entry((node, reporter)).or_default().push((
                0.5 * (-age / half_life).exp2(),
                prefix,
                received,
            ));
        }
        // Per (node, prefix): the reports left, of which again only the
        // two newest count.
        let mut per_prefix: HashMap<(String, String), Vec<(f64, u64)>> = HashMap::new();
        for ((node, _), mut reports) in per_reporter {
            reports.sort_by(|a, b| b.0.total_cmp(&a.0));
            for (value, prefix, received) in reports.into_iter().take(2) {
                per_prefix
                    .entry((node.clone(), prefix))
                    .or_default()
                    .push((value, received));
            }
        }
        // Per prefix: only the nodes it reported most recently.
        let mut by_prefix: HashMap<String, Vec<(u64, String, f64)>> = HashMap::new();
        for ((node, prefix), mut reports) in per_prefix {
            reports.sort_by(|a, b| b.0.total_cmp(&a.0));
            let newest = reports.iter().map(|r| r.1).max().unwrap_or(0);
            let value: f64 = reports.iter().take(2).map(|r| r.0).sum();
            by_prefix.entry(prefix).or_default().push((
                newest,
                node,
                value.min(REPORTER_CAP).min(PREFIX_CAP),
            ));
        }
        let mut out: HashMap<String, f64> = HashMap::new();
        for (_, mut nodes) in by_prefix {
            nodes.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            for (_, node, value) in nodes.into_iter().take(REPORTED_PER_PREFIX) {
                *out.entry(node).or_default() += value;
            }
        }
        for p in out.values_mut() {
            *p = p.min(MAX_PENALTY);
        }
        Ok(out)
    }

    /// When node `identity` was last proven, if it is registered (`None`
    /// inside: registered, never proven or unlisted by a failed probe).
    pub fn proven_at(&self, identity: &[u8; 32]) -> Result<Option<Option<u64>>> {
        self.conn
            .query_row(
                "SELECT proven_at FROM nodes WHERE identity = ?1",
                [hex::encode(identity)],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()
            .db()
            .map(|p| p.map(|p| p.map(from_i64)))
    }

    /// Node `identity`'s registered descriptor, if any.
    pub fn descriptor(&self, identity: &[u8; 32]) -> Result<Option<Descriptor>> {
        let row: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT descriptor, signature FROM nodes WHERE identity = ?1",
                [hex::encode(identity)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .db()?;
        row.map(|(json, sig)| stored_descriptor(&json, &sig).and_then(|s| s.verify_signature()))
            .transpose()
    }

    /// How many nodes are registered, live or not.
    pub fn node_count(&self) -> Result<u64> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM nodes", [], |r| r.get(0))
            .db()?;
        Ok(from_i64(n))
    }

    fn rows(
        &self,
        identity: Option<&str>,
        seen_since: u64,
        now: u64,
        config: &DirectoryConfig,
    ) -> Result<Vec<(SignedDescriptor, History)>> {
        let mut stmt = self.conn.prepare(
            "SELECT n.descriptor, n.signature, n.first_seen, n.last_seen,
                    h.heartbeats, h.last_heartbeat, h.uptime_secs, h.failures,
                    (SELECT COUNT(*) FROM failures f WHERE f.identity = n.identity AND f.received >= ?3)
             FROM nodes n JOIN history h USING (identity)
             WHERE (?1 IS NULL OR n.identity = ?1) AND n.last_seen >= ?2
             ORDER BY n.identity",
        ).db()?;
        let failures_since = to_i64("now", now.saturating_sub(config.failure_window))?;
        let rows = stmt
            .query_map(
                params![identity, to_i64("now", seen_since)?, failures_since],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        [r.get::<_, i64>(2)?, r.get(3)?, r.get(4)?],
                        r.get::<_, Option<i64>>(5)?,
                        [r.get::<_, i64>(6)?, r.get(7)?, r.get(8)?],
                    ))
                },
            )
            .db()?;
        rows.map(|row| {
            let (
                json,
                sig,
                [first_seen, last_seen, heartbeats],
                last_hb,
                [uptime, failures, recent],
            ) = row.db()?;
            let descriptor = stored_descriptor(&json, &sig)?;
            let counters = Counters {
                first_seen: from_i64(first_seen),
                last_seen: from_i64(last_seen),
                heartbeats: from_i64(heartbeats),
                last_heartbeat: last_hb.map(from_i64),
                uptime_secs: from_i64(uptime),
                failures: from_i64(failures),
                recent_failures: from_i64(recent),
            };
            Ok((descriptor, counters.history(now, config.heartbeat_interval)))
        })
        .collect()
    }
}

/// A report as the penalty counts it: its decayed value, the prefix it
/// came from and when it was received.
type Counted = (f64, String, u64);

fn stored_descriptor(json: &str, sig: &str) -> Result<SignedDescriptor> {
    let mut signature = [0u8; 64];
    hex::decode_to_slice(sig, &mut signature)
        .map_err(|e| DirectoryError::malformed("stored signature", e))?;
    SignedDescriptor::from_parts(json, signature)
}

/// Forgets the nodes not heard from within `config.expiry`.
fn expire(conn: &Connection, now: u64, config: &DirectoryConfig) -> Result<()> {
    let gone = conn
        .execute(
            "DELETE FROM nodes WHERE last_seen < ?1",
            [to_i64("now", now.saturating_sub(config.expiry))?],
        )
        .db()?;
    if gone > 0 {
        tracing::info!(
            "{gone} nodes expired (not heard from in {} s)",
            config.expiry
        );
    }
    Ok(())
}

/// Refuses `d` if it names an address the directory does not probe.
fn check_public(d: &Descriptor, config: &DirectoryConfig) -> Result<()> {
    if config.addresses == Addresses::Local {
        return Ok(());
    }
    match non_public(d.addr.ip()) {
        Some(kind) => Err(DirectoryError::NotPublic {
            addr: d.addr.to_string(),
            kind,
        }),
        None => Ok(()),
    }
}

/// Refuses `d` if another identity heard from within `config.expiry`
/// registered its link or its onion key: one node's keys are listed
/// under one identity (before, two identities with the same keys, both
/// proven, made every designer refuse the whole view).
fn check_keys(conn: &Connection, d: &Descriptor, now: u64, config: &DirectoryConfig) -> Result<()> {
    let since = to_i64("now", now.saturating_sub(config.expiry))?;
    for (what, column, key) in [("link", "link", d.link), ("onion", "onion", d.onion)] {
        let taken = conn
            .query_row(
                &format!(
                    "SELECT 1 FROM nodes WHERE {column} = ?1 AND identity != ?2 AND last_seen >= ?3"
                ),
                params![hex::encode(key), hex::encode(d.identity), since],
                |_| Ok(()),
            )
            .optional()
            .db()?
            .is_some();
        if taken {
            return Err(DirectoryError::KeyTaken { what });
        }
    }
    Ok(())
}

/// Refuses `d` if its prefix already has `config.max_per_prefix` proven
/// nodes other than `d`'s identity and the holder of `d`'s address.
fn check_prefix(conn: &Connection, d: &Descriptor, config: &DirectoryConfig) -> Result<()> {
    if config.allow_same_subnet {
        return Ok(());
    }
    let prefix = listing_prefix(d.addr.ip());
    let n: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM nodes WHERE prefix = ?1 AND identity != ?2 AND addr != ?3
             AND proven_at IS NOT NULL",
            params![prefix, hex::encode(d.identity), d.addr.to_string()],
            |r| r.get(0),
        )
        .db()?;
    if usize::try_from(n).unwrap_or(usize::MAX) >= config.max_per_prefix {
        return Err(DirectoryError::PrefixFull {
            prefix,
            limit: config.max_per_prefix,
        });
    }
    Ok(())
}

fn node_exists(tx: &Transaction<'_>, identity: &str) -> Result<bool> {
    Ok(tx
        .query_row(
            "SELECT 1 FROM nodes WHERE identity = ?1",
            [identity],
            |_| Ok(()),
        )
        .optional()
        .db()?
        .is_some())
}

fn to_i64(field: &'static str, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| DirectoryError::InvalidField {
        field,
        reason: format!("{v} is out of range"),
    })
}

fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
