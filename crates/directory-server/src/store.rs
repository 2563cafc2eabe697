//! The directory's SQLite store: registered nodes, their heartbeat history,
//! and the failure reports designers sent about them.
//!
//! Every write verifies its signed input first and runs in one transaction;
//! the database runs in WAL mode, so a restart (reopening the file) finds
//! everything that was committed.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use mixnn_directory::api::{FailureOutcome, Registration};
use mixnn_directory::{
    Counters, DirectoryError, FailureRecord, History, NodeRecord, Result, SignedDescriptor,
    SignedFailureReport, SignedHeartbeat,
};

use crate::config::DirectoryConfig;

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

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS nodes (
    identity   TEXT PRIMARY KEY,           -- Ed25519 identity key, hex
    addr       TEXT NOT NULL UNIQUE,       -- socket address
    published  INTEGER NOT NULL,           -- descriptor's published (unix s)
    descriptor TEXT NOT NULL,              -- the signed descriptor JSON, verbatim
    signature  TEXT NOT NULL,              -- hex
    first_seen INTEGER NOT NULL,           -- first registration (directory clock)
    last_seen  INTEGER NOT NULL            -- last registration or heartbeat
);
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
    UNIQUE (identity, reporter, step)
);
CREATE INDEX IF NOT EXISTS failures_by_node ON failures (identity, received);
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
        conn.execute_batch(SCHEMA).db()?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .db()?;
        Ok(Self { conn })
    }

    /// Verifies and registers a descriptor ([`SignedDescriptor::verify`]
    /// with `config.max_descriptor_age`). Refuses an address registered
    /// under another identity key, and a descriptor not newer than the
    /// registered one (unless it is the very same).
    pub fn register(
        &mut self,
        signed: &SignedDescriptor,
        now: u64,
        config: &DirectoryConfig,
    ) -> Result<Registration> {
        let d = signed.verify(now, config.max_descriptor_age)?;
        let identity = hex::encode(d.identity);
        let addr = d.addr.to_string();
        let signature = hex::encode(signed.signature());
        let tx = self.conn.transaction().db()?;
        let owner: Option<String> = tx
            .query_row("SELECT identity FROM nodes WHERE addr = ?1", [&addr], |r| {
                r.get(0)
            })
            .optional()
            .db()?;
        if owner.is_some_and(|o| o != identity) {
            return Err(DirectoryError::AddressTaken { addr });
        }
        let existing: Option<(i64, String, String)> = tx
            .query_row(
                "SELECT published, descriptor, signature FROM nodes WHERE identity = ?1",
                [&identity],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .db()?;
        let (published, now_i) = (to_i64("published", d.published)?, to_i64("now", now)?);
        let outcome = match existing {
            None => {
                tx.execute(
                    "INSERT INTO nodes (identity, addr, published, descriptor, signature, first_seen, last_seen)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                    params![identity, addr, published, signed.descriptor_json(), signature, now_i],
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
                    "UPDATE nodes SET addr = ?2, published = ?3, descriptor = ?4, signature = ?5, last_seen = ?6
                     WHERE identity = ?1",
                    params![identity, addr, published, signed.descriptor_json(), signature, now_i],
                ).db()?;
                outcome
            }
        };
        tx.commit().db()?;
        tracing::debug!(?outcome, "descriptor registered");
        Ok(outcome)
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

    /// Verifies and stores a failure report about a registered node. With
    /// `config.accepted_reporters` set, only those designer keys may report.
    pub fn report_failure(
        &mut self,
        signed: &SignedFailureReport,
        now: u64,
        config: &DirectoryConfig,
    ) -> Result<FailureOutcome> {
        let report = signed.verify(now, config.max_report_age)?;
        if let Some(accepted) = &config.accepted_reporters {
            if !accepted.contains(&report.reporter) {
                return Err(DirectoryError::UnknownReporter {
                    reporter: hex::encode(report.reporter),
                });
            }
        }
        let identity = hex::encode(report.node);
        let tx = self.conn.transaction().db()?;
        if !node_exists(&tx, &identity)? {
            return Err(DirectoryError::UnknownNode { identity });
        }
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO failures (identity, reporter, step, reason, timestamp, received, signature)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                identity,
                hex::encode(report.reporter),
                to_i64("step", report.step)?,
                report.reason,
                to_i64("timestamp", report.timestamp)?,
                to_i64("now", now)?,
                hex::encode(signed.signature()),
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

    /// Every node seen (registered or heartbeating) within
    /// `config.live_window` of `now`, ordered by identity key.
    pub fn live_nodes(
        &self,
        now: u64,
        config: &DirectoryConfig,
    ) -> Result<Vec<(SignedDescriptor, History)>> {
        self.rows(None, now.saturating_sub(config.live_window), now, config)
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
            let mut signature = [0u8; 64];
            hex::decode_to_slice(&sig, &mut signature)
                .map_err(|e| DirectoryError::malformed("stored signature", e))?;
            let descriptor = SignedDescriptor::from_parts(&json, signature)?;
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
