//! The daemon's embedded database (SQLite): instances, enrollment tokens, issued
//! certificates, runs and every run event. The cloud is the truth for what exists; this is
//! what runctl did. All access goes through one connection behind a mutex: statements are
//! short, and a single writer keeps token burning and event insertion atomic.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use protocol::{EnrollToken, ErrorKind, Fingerprint, InstanceName, RunEnd, RunEvent, RunId};
use rusqlite::{Connection, OptionalExtension, params};

use crate::provider::ProviderKind;
use crate::run_state::{self, Held};
use serde::{Deserialize, Serialize};

const SCHEMA_VERSION: i64 = 10;

/// Version 2 added where each run's checkpoints go.
const MIGRATE_1_TO_2: &str =
    "CREATE TABLE run_checkpoints (run_id TEXT PRIMARY KEY, url TEXT NOT NULL);";

/// `MIGRATIONS[n]` takes a database from version n + 1 to n + 2.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize - 1] = [
    MIGRATE_1_TO_2,
    MIGRATE_2_TO_3,
    MIGRATE_3_TO_4,
    MIGRATE_4_TO_5,
    MIGRATE_5_TO_6,
    MIGRATE_6_TO_7,
    MIGRATE_7_TO_8,
    MIGRATE_8_TO_9,
    MIGRATE_9_TO_10,
];

/// Version 10: an ended run's log is compacted once it is old (`retention`): when.
const MIGRATE_9_TO_10: &str = "ALTER TABLE runs ADD COLUMN compacted_ms INTEGER;";

/// Version 9: a cloud instance may be one of a group its provider makes and ends only
/// together (a RunPod cluster, `--nodes N --provider runpod`): the group's id.
const MIGRATE_8_TO_9: &str = "ALTER TABLE cloud_instances ADD COLUMN cluster TEXT;";

/// Version 8: a gang restarts (all its nodes at once) and a spot run is relaunched
/// (`--on-interrupt relaunch`), so the daemon keeps what it started the run with (`start`,
/// JSON: [`StoredStart`]; no secret values), the restarts and relaunches made so far;
/// each node keeps which attempt its events are in (a `StartedAgain` notice moves it on),
/// so an end from an earlier attempt, replayed late, does not end the current one; and
/// each instance a node has run on is an incarnation of it (`run_incarnations`; none
/// listed: incarnation 0 on the run's own instances), whose events are its own source.
const MIGRATE_7_TO_8: &str = "
CREATE TABLE run_starts (
    run_id TEXT PRIMARY KEY,
    start TEXT NOT NULL,
    restarts INTEGER NOT NULL DEFAULT 0,
    quick_failures INTEGER NOT NULL DEFAULT 0,
    attempt_ms INTEGER NOT NULL,
    relaunches INTEGER NOT NULL DEFAULT 0
);
ALTER TABLE run_nodes ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
CREATE TABLE run_incarnations (
    run_id TEXT NOT NULL,
    instance TEXT NOT NULL,
    node INTEGER NOT NULL,
    incarnation INTEGER NOT NULL,
    PRIMARY KEY (run_id, instance)
) WITHOUT ROWID;
";

/// What a run was started with, kept to start it again (a gang's restart, a spot run's
/// relaunch): the spec as sent to node 0 before its per-node changes, the launch, whether
/// every node pushes checkpoints, the names (never the values) of its secrets, what it
/// does when interrupted, and how its instance was launched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredStart {
    pub spec: protocol::RunSpec,
    pub launch: Option<protocol::launch::Launch>,
    pub all_checkpoints: bool,
    pub secret_names: Vec<String>,
    #[serde(default)]
    pub on_interrupt: crate::relaunch::OnInterrupt,
    #[serde(default)]
    pub launch_options: Option<crate::provider::LaunchOptions>,
}

/// A spot run under `--on-interrupt relaunch`: its current instances (a gang's in node
/// order) and the number of a relaunch decided but not made, if one is.
pub type SpotRun = (RunId, Vec<InstanceName>, Option<u32>);

/// A spot run to relaunch: replacement `number`, after `interruption`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relaunch {
    pub number: u32,
    pub interruption: crate::relaunch::Interruption,
}

/// What storing a batch of events did to the run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stored {
    /// The source's highest stored sequence number.
    pub last_seq: u64,
    /// The run's terminal state, if it just ended.
    pub ended: Option<RunState>,
    /// The gang starts again (its nodes' ends are cleared, the restart counted).
    pub restart: Option<crate::gang::Restart>,
    /// The spot run is relaunched (the relaunch counted, the run not ended).
    pub relaunch: Option<Relaunch>,
}

/// Version 7: a run may have several nodes (`run --nodes`), each on an instance of its
/// own (node 0's is the run's `instance`), each reporting its own end; the run ends when
/// the gang says (see `gang`). A run of one node has no rows here.
const MIGRATE_6_TO_7: &str = "
CREATE TABLE run_nodes (
    run_id TEXT NOT NULL,
    node INTEGER NOT NULL,
    instance TEXT NOT NULL,
    end_kind TEXT,
    end_ms INTEGER,
    PRIMARY KEY (run_id, node)
) WITHOUT ROWID;
CREATE INDEX run_nodes_by_instance ON run_nodes(instance);
";

/// Version 6: runs may have a budget (`--max-cost`, `--max-hours`), counted from
/// `since_ms` (the launch of an instance made for the run, else the run's creation), and
/// keep whether their budget stopped them (read when they end, as `spot_notice` is).
const MIGRATE_5_TO_6: &str = "
CREATE TABLE run_budgets (
    run_id TEXT PRIMARY KEY,
    max_cost REAL,
    max_ms INTEGER,
    since_ms INTEGER NOT NULL
);
ALTER TABLE runs ADD COLUMN budget_notice INTEGER NOT NULL DEFAULT 0;
";

/// A run's caps, as the user gave them, and when its spend began.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunBudget {
    /// Dollars.
    pub max_cost: Option<f64>,
    pub max_ms: Option<u64>,
    pub since_ms: u64,
}

/// Version 5: a run's events come from sources, each numbering its own: a node of the run
/// and an incarnation of that node's agent (a replacement after an interruption is a new
/// one). Events are kept per (source, seq), where version 4 kept one per seq and would
/// have dropped a second source's as repeats, and each gets `shown`, the daemon's own
/// order across the run's sources, which is what clients see as an event's number. Old
/// events are node 0, incarnation 0, shown as they were numbered.
const MIGRATE_4_TO_5: &str = "
CREATE TABLE run_events_v5 (
    run_id TEXT NOT NULL,
    shown INTEGER NOT NULL,
    node INTEGER NOT NULL,
    incarnation INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (run_id, shown),
    UNIQUE (run_id, node, incarnation, seq)
) WITHOUT ROWID;
INSERT INTO run_events_v5 SELECT run_id, seq, 0, 0, seq, at_ms, kind FROM run_events;
DROP TABLE run_events;
ALTER TABLE run_events_v5 RENAME TO run_events;
";

/// Where a run's events come from: one node of the run, one life of its agent. Each
/// numbers its events itself, from 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Source {
    pub node: u32,
    pub incarnation: u32,
}

/// Version 3 added cloud instances: their ids, prices and billed time.
const MIGRATE_2_TO_3: &str = "
CREATE TABLE cloud_instances (
    name TEXT PRIMARY KEY,
    cloud_id TEXT NOT NULL,
    region TEXT NOT NULL,
    instance_type TEXT NOT NULL,
    spot INTEGER NOT NULL,
    price_per_hour REAL,
    accrued_ms INTEGER NOT NULL DEFAULT 0,
    running_since_ms INTEGER
);";

/// Version 4: the provider is one of a closed set (the table is rebuilt: SQLite cannot add
/// a CHECK to a column; `runpod` is admitted ahead of its provider so that adding it
/// needs no rebuild), and a run keeps whether a spot notice came (read when it ends),
/// filled in once from the stored events.
const MIGRATE_3_TO_4: &str = "
CREATE TABLE instances_v4 (
    name TEXT PRIMARY KEY,
    provider TEXT NOT NULL CHECK (provider IN ('local', 'ec2', 'runpod')),
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    terminated_ms INTEGER,
    pid INTEGER,
    for_run TEXT
);
INSERT INTO instances_v4 SELECT name, provider, state, created_ms, terminated_ms, pid, for_run FROM instances;
DROP TABLE instances;
ALTER TABLE instances_v4 RENAME TO instances;
ALTER TABLE runs ADD COLUMN spot_notice INTEGER NOT NULL DEFAULT 0;
UPDATE runs SET spot_notice = 1 WHERE id IN
    (SELECT run_id FROM run_events WHERE kind LIKE '{\"notice\":{\"spot_interruption\"%');
";

/// The schema of version 1; a new database gets it and then every migration, so the
/// current schema is written down once.
const SCHEMA_V1: &str = "
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE instances (
    name TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    terminated_ms INTEGER,
    pid INTEGER,
    for_run TEXT
);
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_ms INTEGER
);
CREATE TABLE certs (
    fingerprint TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    issued_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    argv TEXT NOT NULL,
    workdir TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    started_ms INTEGER,
    ended_ms INTEGER,
    exit TEXT,
    error TEXT
);
CREATE INDEX runs_by_instance ON runs(instance);
CREATE TABLE run_events (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Created; its agent has not connected yet.
    Launching,
    Running,
    /// Powered off, restartable (a cloud instance's `stop`).
    Stopped,
    Terminated,
}

/// What runctl knows of a cloud instance beyond its row in `instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudRow {
    pub name: InstanceName,
    /// The provider's id (`i-...`).
    pub cloud_id: String,
    pub region: String,
    pub instance_type: String,
    pub spot: bool,
    /// $/hour: the on-demand price, or the spot price at launch.
    pub price_per_hour: Option<f64>,
    /// Running time billed before `running_since_ms`.
    pub accrued_ms: u64,
    /// Since when it has been running (billed), if it is.
    pub running_since_ms: Option<u64>,
    /// The group its provider makes and ends it with (a RunPod cluster's id), if any.
    pub cluster: Option<String>,
}

impl CloudRow {
    /// The running time so far, in ms.
    pub fn billed_ms(&self, now_ms: u64) -> u64 {
        self.accrued_ms
            + self
                .running_since_ms
                .map_or(0, |since| now_ms.saturating_sub(since))
    }

    /// What it has cost so far, if its price is known.
    pub fn cost(&self, now_ms: u64) -> Option<f64> {
        self.price_per_hour
            .map(|p| p * self.billed_ms(now_ms) as f64 / 3_600_000.0)
    }
}

pub use crate::run_state::RunState;

fn text<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn parse<T: for<'de> Deserialize<'de>>(s: &str) -> rusqlite::Result<T> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn parse_json<T: for<'de> Deserialize<'de>>(s: &str) -> rusqlite::Result<T> {
    serde_json::from_str(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// Why an enrollment token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No token with this hash was minted here.
    Unknown,
    /// It was used (or revoked) already.
    Reused,
    /// Its lifetime is over.
    Expired,
}

impl TokenRefusal {
    /// The refusal as the agent hears it.
    pub fn to_wire(self) -> protocol::WireError {
        let (kind, message) = match self {
            TokenRefusal::Unknown => (
                ErrorKind::TokenUnknown,
                "the enrollment token is unknown to this controller",
            ),
            TokenRefusal::Reused => (
                ErrorKind::TokenReused,
                "the enrollment token was already used",
            ),
            TokenRefusal::Expired => (ErrorKind::TokenExpired, "the enrollment token has expired"),
        };
        protocol::WireError::new(kind, message)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRow {
    pub name: InstanceName,
    pub provider: ProviderKind,
    pub state: InstanceState,
    pub created_ms: u64,
    pub terminated_ms: Option<u64>,
    pub pid: Option<u32>,
    /// The run this instance was launched for; it is terminated when that run ends.
    pub for_run: Option<RunId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRow {
    pub id: RunId,
    pub instance: InstanceName,
    pub argv: Vec<String>,
    /// The project root synced to the run (the `workdir` column).
    pub root: String,
    pub state: RunState,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    pub exit: Option<RunEnd>,
    pub error: Option<String>,
}

#[derive(Debug)]
pub struct Db {
    conn: Mutex<Connection>,
    /// A second connection for the reads that answer the CLI (`status`, `list`, `logs`)
    /// and check where events come from: in WAL mode it reads what is committed while the
    /// first one writes, so a long batch of events never holds them up.
    reader: Mutex<Connection>,
}

fn token_hash(token: &EnrollToken) -> String {
    Fingerprint::of_der(token.expose().as_bytes()).to_string()
}

impl Db {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Run events land at the ends of many runs' key ranges at once: keep those pages
        // in memory (32 MiB, against SQLite's 2 MiB default) instead of reading them again.
        conn.pragma_update(None, "cache_size", -32_768)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            anyhow::bail!(
                "database {} has schema version {version}, newer than this runctl-controller understands ({SCHEMA_VERSION}); install a newer runctl-controller",
                path.display()
            );
        }
        if version < SCHEMA_VERSION {
            let base = if version == 0 { SCHEMA_V1 } else { "" };
            let steps = MIGRATIONS[(version.max(1) - 1) as usize..].concat();
            conn.execute_batch(&format!(
                "BEGIN; {base} {steps} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))
            .with_context(|| {
                format!("bringing the database schema from version {version} to {SCHEMA_VERSION}")
            })?;
        }
        let reader = Connection::open(path)
            .with_context(|| format!("opening database {}", path.display()))?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;
        reader.pragma_update(None, "query_only", true)?;
        Ok(Db {
            conn: Mutex::new(conn),
            reader: Mutex::new(reader),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().expect("database lock is never poisoned")
    }

    /// The read-only connection: each statement sees everything committed before it.
    fn read(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader.lock().expect("database lock is never poisoned")
    }

    pub fn setting(&self, key: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .lock()
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn set_setting(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
            [key, value],
        )?;
        Ok(())
    }

    /// Removes `key` and returns its value, if it was set.
    pub fn take_setting(&self, key: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .lock()
            .query_row(
                "DELETE FROM settings WHERE key = ?1 RETURNING value",
                [key],
                |r| r.get(0),
            )
            .optional()?)
    }

    // --- instances -------------------------------------------------------------------

    pub fn insert_instance(&self, row: &InstanceRow) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT INTO instances (name, provider, state, created_ms, terminated_ms, pid, for_run) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                row.name.as_str(),
                row.provider,
                text(&row.state),
                row.created_ms,
                row.terminated_ms,
                row.pid,
                row.for_run.as_ref().map(|r| r.as_str())
            ],
        )?;
        Ok(())
    }

    pub fn set_instance_pid(&self, name: &InstanceName, pid: u32) -> anyhow::Result<()> {
        self.lock().execute(
            "UPDATE instances SET pid = ?2 WHERE name = ?1",
            params![name.as_str(), pid],
        )?;
        Ok(())
    }

    pub fn set_instance_state(
        &self,
        name: &InstanceName,
        state: InstanceState,
        now_ms: u64,
    ) -> anyhow::Result<()> {
        let terminated = (state == InstanceState::Terminated).then_some(now_ms);
        self.lock().execute(
            "UPDATE instances SET state = ?2, terminated_ms = COALESCE(terminated_ms, ?3) WHERE name = ?1",
            params![name.as_str(), text(&state), terminated],
        )?;
        Ok(())
    }

    /// Moves a terminated instance's record, with its runs, tokens, certificates and cloud
    /// facts, to the name `to`, so that its own name can be used again. `false` (and
    /// nothing changed) when `name` is not a terminated instance.
    pub fn retire_instance(&self, name: &InstanceName, to: &InstanceName) -> anyhow::Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let moved = tx.execute(
            "UPDATE instances SET name = ?2 WHERE name = ?1 AND state = 'terminated'",
            params![name.as_str(), to.as_str()],
        )?;
        if moved == 1 {
            for table in ["runs", "tokens", "certs"] {
                tx.execute(
                    &format!("UPDATE {table} SET instance = ?2 WHERE instance = ?1"),
                    params![name.as_str(), to.as_str()],
                )?;
            }
            tx.execute(
                "UPDATE cloud_instances SET name = ?2 WHERE name = ?1",
                params![name.as_str(), to.as_str()],
            )?;
        }
        tx.commit()?;
        Ok(moved == 1)
    }

    pub fn instance(&self, name: &InstanceName) -> anyhow::Result<Option<InstanceRow>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT name, provider, state, created_ms, terminated_ms, pid, for_run FROM instances WHERE name = ?1",
                [name.as_str()],
                instance_row,
            )
            .optional()?)
    }

    pub fn instances(&self) -> anyhow::Result<Vec<InstanceRow>> {
        let conn = self.read();
        let mut stmt = conn.prepare(
            "SELECT name, provider, state, created_ms, terminated_ms, pid, for_run FROM instances ORDER BY created_ms, name",
        )?;
        let rows = stmt
            .query_map([], instance_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn insert_cloud(&self, row: &CloudRow) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT INTO cloud_instances (name, cloud_id, region, instance_type, spot, price_per_hour, accrued_ms, running_since_ms, cluster) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                row.name.as_str(),
                row.cloud_id,
                row.region,
                row.instance_type,
                row.spot,
                row.price_per_hour,
                row.accrued_ms,
                row.running_since_ms,
                row.cluster
            ],
        )?;
        Ok(())
    }

    pub fn cloud(&self, name: &InstanceName) -> anyhow::Result<Option<CloudRow>> {
        Ok(self
            .read()
            .query_row(
                "SELECT name, cloud_id, region, instance_type, spot, price_per_hour, accrued_ms, running_since_ms, cluster FROM cloud_instances WHERE name = ?1",
                [name.as_str()],
                cloud_row,
            )
            .optional()?)
    }

    /// The instances of cluster `cluster` not yet terminated.
    pub fn live_cluster_members(&self, cluster: &str) -> anyhow::Result<Vec<InstanceName>> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT c.name FROM cloud_instances c JOIN instances i ON i.name = c.name WHERE c.cluster = ?1 AND i.state != 'terminated' ORDER BY c.name",
        )?;
        let names: Vec<String> = stmt
            .query_map([cluster], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        names.iter().map(|n| Ok(n.parse()?)).collect()
    }

    /// Every cloud instance runctl launched.
    pub fn clouds(&self) -> anyhow::Result<Vec<CloudRow>> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT name, cloud_id, region, instance_type, spot, price_per_hour, accrued_ms, running_since_ms, cluster FROM cloud_instances ORDER BY name",
        )?;
        let rows = stmt.query_map([], cloud_row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Starts or ends a billed period: `running` true from `now_ms` on, false up to it.
    pub fn set_cloud_running(
        &self,
        name: &InstanceName,
        running: bool,
        now_ms: u64,
    ) -> anyhow::Result<()> {
        let conn = self.lock();
        if running {
            conn.execute(
                "UPDATE cloud_instances SET running_since_ms = COALESCE(running_since_ms, ?2) WHERE name = ?1",
                params![name.as_str(), now_ms],
            )?;
        } else {
            conn.execute(
                "UPDATE cloud_instances SET accrued_ms = accrued_ms + MAX(0, ?2 - running_since_ms), running_since_ms = NULL WHERE name = ?1 AND running_since_ms IS NOT NULL",
                params![name.as_str(), now_ms],
            )?;
        }
        Ok(())
    }

    // --- tokens and certificates -----------------------------------------------------

    /// Mints a single-use token for `instance`, valid until `expires_ms`. Only its hash is kept.
    pub fn mint_token(
        &self,
        instance: &InstanceName,
        expires_ms: u64,
    ) -> anyhow::Result<EnrollToken> {
        let token = EnrollToken::from_random(rand::random());
        self.lock().execute(
            "INSERT INTO tokens (hash, instance, expires_ms) VALUES (?1, ?2, ?3)",
            params![token_hash(&token), instance.as_str(), expires_ms],
        )?;
        Ok(token)
    }

    /// Burns `token` and returns the instance it was minted for. Checking and burning are
    /// one statement under the connection lock, so a token can never be used twice.
    pub fn consume_token(
        &self,
        token: &EnrollToken,
        now_ms: u64,
    ) -> anyhow::Result<Result<InstanceName, TokenRefusal>> {
        let conn = self.lock();
        let hash = token_hash(token);
        let row: Option<(String, u64, Option<u64>)> = conn
            .query_row(
                "SELECT instance, expires_ms, used_ms FROM tokens WHERE hash = ?1",
                [&hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((instance, expires_ms, used_ms)) = row else {
            return Ok(Err(TokenRefusal::Unknown));
        };
        if used_ms.is_some() {
            return Ok(Err(TokenRefusal::Reused));
        }
        if now_ms >= expires_ms {
            return Ok(Err(TokenRefusal::Expired));
        }
        let burnt = conn.execute(
            "UPDATE tokens SET used_ms = ?2 WHERE hash = ?1 AND used_ms IS NULL",
            params![hash, now_ms],
        )?;
        if burnt != 1 {
            return Ok(Err(TokenRefusal::Reused));
        }
        Ok(Ok(instance.parse()?))
    }

    pub fn record_cert(
        &self,
        fingerprint: Fingerprint,
        instance: &InstanceName,
        now_ms: u64,
    ) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT INTO certs (fingerprint, instance, issued_ms) VALUES (?1, ?2, ?3)",
            params![fingerprint.to_string(), instance.as_str(), now_ms],
        )?;
        Ok(())
    }

    /// The instance a certificate was issued to, and whether it has been revoked.
    /// Whether an agent of `instance` has ever enrolled (a certificate was issued to it).
    pub fn has_enrolled(&self, instance: &InstanceName) -> anyhow::Result<bool> {
        let conn = self.read();
        let found: Option<i64> = conn
            .query_row(
                "SELECT 1 FROM certs WHERE instance = ?1 LIMIT 1",
                [instance.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(found.is_some())
    }

    pub fn cert(&self, fingerprint: Fingerprint) -> anyhow::Result<Option<(InstanceName, bool)>> {
        let row: Option<(String, Option<u64>)> = self
            .lock()
            .query_row(
                "SELECT instance, revoked_ms FROM certs WHERE fingerprint = ?1",
                [fingerprint.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(instance, revoked)| Ok((instance.parse()?, revoked.is_some())))
            .transpose()
    }

    /// Revokes every certificate issued to `instance`, and any token not yet used.
    pub fn revoke_instance(&self, instance: &InstanceName, now_ms: u64) -> anyhow::Result<usize> {
        let conn = self.lock();
        let revoked = conn.execute(
            "UPDATE certs SET revoked_ms = ?2 WHERE instance = ?1 AND revoked_ms IS NULL",
            params![instance.as_str(), now_ms],
        )?;
        conn.execute(
            "UPDATE tokens SET used_ms = ?2 WHERE instance = ?1 AND used_ms IS NULL",
            params![instance.as_str(), now_ms],
        )?;
        Ok(revoked)
    }

    // --- runs --------------------------------------------------------------------------

    pub fn insert_run(&self, row: &RunRow) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT INTO runs (id, instance, argv, workdir, state, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                row.id.as_str(),
                row.instance.as_str(),
                serde_json::to_string(&row.argv)?,
                row.root,
                text(&row.state),
                row.created_ms
            ],
        )?;
        Ok(())
    }

    /// Records where a run's checkpoints go (`s3://bucket/prefix/<run>/`).
    pub fn set_run_checkpoints(&self, id: &RunId, url: &str) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT OR REPLACE INTO run_checkpoints (run_id, url) VALUES (?1, ?2)",
            params![id.as_str(), url],
        )?;
        Ok(())
    }

    /// Where a run's checkpoints go, if it pushes them.
    pub fn run_checkpoints(&self, id: &RunId) -> anyhow::Result<Option<String>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT url FROM run_checkpoints WHERE run_id = ?1",
                params![id.as_str()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Records a run's budget.
    pub fn set_run_budget(&self, id: &RunId, budget: &RunBudget) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT OR REPLACE INTO run_budgets (run_id, max_cost, max_ms, since_ms) VALUES (?1, ?2, ?3, ?4)",
            params![id.as_str(), budget.max_cost, budget.max_ms, budget.since_ms],
        )?;
        Ok(())
    }

    /// A run's budget, if it has one.
    pub fn run_budget(&self, id: &RunId) -> anyhow::Result<Option<RunBudget>> {
        Ok(self
            .read()
            .query_row(
                "SELECT max_cost, max_ms, since_ms FROM run_budgets WHERE run_id = ?1",
                params![id.as_str()],
                |r| {
                    Ok(RunBudget {
                        max_cost: r.get(0)?,
                        max_ms: r.get(1)?,
                        since_ms: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// Moves a run to `state` unless it already ended; returns whether it changed.
    pub fn set_run_state(
        &self,
        id: &RunId,
        state: RunState,
        now_ms: u64,
        error: Option<&str>,
    ) -> anyhow::Result<bool> {
        let started = (state == RunState::Running).then_some(now_ms);
        let ended = state.is_terminal().then_some(now_ms);
        let changed = self.lock().execute(
            "UPDATE runs SET state = ?2, started_ms = COALESCE(started_ms, ?3), ended_ms = COALESCE(ended_ms, ?4), error = COALESCE(?5, error)
             WHERE id = ?1 AND state NOT IN ('succeeded', 'failed', 'stopped', 'interrupted', 'budget_exceeded')",
            params![id.as_str(), text(&state), started, ended, error],
        )?;
        Ok(changed == 1)
    }

    pub fn run(&self, id: &RunId) -> anyhow::Result<Option<RunRow>> {
        Ok(self
            .read()
            .query_row(
                &format!("{RUN_SELECT} WHERE id = ?1"),
                [id.as_str()],
                run_row,
            )
            .optional()?)
    }

    pub fn runs(&self) -> anyhow::Result<Vec<RunRow>> {
        let conn = self.read();
        let mut stmt = conn.prepare(&format!("{RUN_SELECT} ORDER BY created_ms, id"))?;
        let rows = stmt.query_map([], run_row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    pub fn runs_on(&self, instance: &InstanceName) -> anyhow::Result<Vec<RunRow>> {
        let conn = self.read();
        let mut stmt = conn.prepare(&format!(
            "{RUN_SELECT} WHERE instance = ?1 OR id IN (SELECT run_id FROM run_nodes WHERE instance = ?1) ORDER BY created_ms"
        ))?;
        let rows = stmt
            .query_map([instance.as_str()], run_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Records the instances of a run's nodes, node 0's first (a run of several nodes).
    pub fn insert_run_nodes(&self, run: &RunId, instances: &[InstanceName]) -> anyhow::Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        for (node, instance) in instances.iter().enumerate() {
            tx.execute(
                "INSERT INTO run_nodes (run_id, node, instance) VALUES (?1, ?2, ?3)",
                params![run.as_str(), node as u32, instance.as_str()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The instances of a run's nodes, in node order: its one instance for a run of one.
    pub fn run_nodes(&self, run: &RunRow) -> anyhow::Result<Vec<InstanceName>> {
        let conn = self.read();
        let mut stmt =
            conn.prepare_cached("SELECT instance FROM run_nodes WHERE run_id = ?1 ORDER BY node")?;
        let nodes: Vec<InstanceName> = stmt
            .query_map([run.id.as_str()], |r| {
                let name: String = r.get(0)?;
                parse(&name)
            })?
            .collect::<Result<_, _>>()?;
        Ok(match nodes.is_empty() {
            true => vec![run.instance.clone()],
            false => nodes,
        })
    }

    /// Which node of `run` runs on `instance`, if one does.
    pub fn node_of(&self, run: &RunRow, instance: &InstanceName) -> anyhow::Result<Option<u32>> {
        // Node 0's is the run's own: no query on the path of every event batch.
        if &run.instance == instance {
            return Ok(Some(0));
        }
        Ok(self
            .run_nodes(run)?
            .iter()
            .position(|i| i == instance)
            .map(|n| n as u32))
    }

    /// The pid (and process group) of the process node `node` of `run` last started.
    pub fn last_started_pid(&self, run: &RunId, node: u32) -> anyhow::Result<Option<u32>> {
        let kind: Option<String> = self
            .lock()
            .query_row(
                "SELECT kind FROM run_events WHERE run_id = ?1 AND node = ?2 AND kind LIKE '{\"started\":%' ORDER BY shown DESC LIMIT 1",
                params![run.as_str(), node],
                |r| r.get(0),
            )
            .optional()?;
        Ok(match kind.map(|k| serde_json::from_str(&k)).transpose()? {
            Some(protocol::EventKind::Started { pid, .. }) => Some(pid),
            _ => None,
        })
    }

    /// The ends a gang's nodes have reported so far.
    pub fn node_ends(&self, run: &RunId) -> anyhow::Result<Vec<crate::gang::NodeEnd>> {
        node_ends_of(&self.lock(), run)
    }

    /// Keeps what a gang's nodes were started with, and when the attempt began.
    pub fn set_run_start(
        &self,
        run: &RunId,
        start: &StoredStart,
        attempt_ms: u64,
    ) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT OR REPLACE INTO run_starts (run_id, start, attempt_ms) VALUES (?1, ?2, ?3)",
            params![run.as_str(), serde_json::to_string(start)?, attempt_ms],
        )?;
        Ok(())
    }

    /// What a gang's nodes were started with, if it is kept.
    pub fn run_start(&self, run: &RunId) -> anyhow::Result<Option<StoredStart>> {
        let start: Option<String> = self
            .lock()
            .query_row(
                "SELECT start FROM run_starts WHERE run_id = ?1",
                [run.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(start.map(|s| serde_json::from_str(&s)).transpose()?)
    }

    /// The attempt a run's nodes are in once started again: one after every restart and
    /// relaunch made so far (1 before any).
    pub fn gang_attempt(&self, run: &RunId) -> anyhow::Result<u32> {
        gang_attempt_of(&self.lock(), run)
    }

    /// How many relaunches of `run` were decided so far (the gang's place is named by it).
    pub fn relaunches(&self, run: &RunId) -> anyhow::Result<u32> {
        Ok(self
            .lock()
            .query_row(
                "SELECT relaunches FROM run_starts WHERE run_id = ?1",
                [run.as_str()],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0))
    }

    /// Marks when a gang's new attempt began (its restart's backoff counts from there).
    pub fn set_attempt_started(&self, run: &RunId, attempt_ms: u64) -> anyhow::Result<()> {
        self.lock().execute(
            "UPDATE run_starts SET attempt_ms = ?2 WHERE run_id = ?1",
            params![run.as_str(), attempt_ms],
        )?;
        Ok(())
    }

    /// Gangs still going whose restart was decided (counted) but whose nodes have not
    /// begun it (and that wait for no relaunch), with the attempt they wait for.
    pub fn pending_restarts(&self) -> anyhow::Result<Vec<(RunId, u32)>> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT s.run_id, s.restarts + s.relaunches + 1 FROM run_starts s JOIN runs r ON r.id = s.run_id
             WHERE s.restarts > 0
               AND r.state NOT IN ('succeeded', 'failed', 'stopped', 'interrupted', 'budget_exceeded')
               AND NOT EXISTS (SELECT 1 FROM run_nodes n WHERE n.run_id = s.run_id AND n.attempt > s.restarts + s.relaunches)
               AND s.relaunches <= COALESCE((SELECT MAX(i.incarnation) FROM run_incarnations i WHERE i.run_id = s.run_id AND i.node = 0), 0)",
        )?;
        let rows = stmt
            .query_map([], |r| {
                let run: String = r.get(0)?;
                Ok((parse(&run)?, r.get(1)?))
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Whether node 0 of `run` has pushed a checkpoint completely (its `LATEST` exists).
    pub fn pushed_checkpoint(&self, run: &RunId) -> anyhow::Result<bool> {
        Ok(self.lock().query_row(
            "SELECT EXISTS (SELECT 1 FROM run_events WHERE run_id = ?1 AND node = 0 AND kind LIKE '{\"checkpoint\":%' AND kind LIKE '%\"uploaded\":%')",
            [run.as_str()],
            |r| r.get(0),
        )?)
    }

    /// Stores events from `source` (ignoring any of its already stored), each given the
    /// run's next `shown` number, and, when the run's `Ended` event is among them, ends the
    /// run in the same transaction (or, for a gang, records the node's end and ends the
    /// run or starts it again when the gang says so).
    pub fn insert_events(
        &self,
        run: &RunId,
        source: Source,
        events: &[RunEvent],
    ) -> anyhow::Result<Stored> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let stored = insert_events_in(&tx, run, source, events)?;
        tx.commit()?;
        Ok(stored)
    }

    /// Several runs' events, each as `insert_events` stores them, in one transaction (the
    /// daemon's writer gathers what every agent sent meanwhile): one commit for all. Each
    /// batch stands or fails alone.
    pub fn insert_event_batches(
        &self,
        batches: &[(&RunId, Source, &[RunEvent])],
    ) -> anyhow::Result<Vec<anyhow::Result<Stored>>> {
        let mut conn = self.lock();
        let mut tx = conn.transaction()?;
        let mut results = Vec::with_capacity(batches.len());
        for &(run, source, events) in batches {
            let savepoint = tx.savepoint()?;
            match insert_events_in(&savepoint, run, source, events) {
                Ok(stored) => {
                    savepoint.commit()?;
                    results.push(Ok(stored));
                }
                // Dropping the savepoint rolls this batch back alone.
                Err(e) => results.push(Err(e)),
            }
        }
        tx.commit()?;
        Ok(results)
    }

    /// Where events from `instance` for `run` come from: the incarnation of a node it
    /// was relaunched on, else incarnation 0 of the node it runs; `None`: not the run's.
    pub fn source_of(
        &self,
        run: &RunRow,
        instance: &InstanceName,
    ) -> anyhow::Result<Option<Source>> {
        let listed: Option<(u32, u32)> = self
            .read()
            .query_row(
                "SELECT node, incarnation FROM run_incarnations WHERE run_id = ?1 AND instance = ?2",
                params![run.id.as_str(), instance.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((node, incarnation)) = listed {
            return Ok(Some(Source { node, incarnation }));
        }
        Ok(self.node_of(run, instance)?.map(|node| Source {
            node,
            incarnation: 0,
        }))
    }

    /// A spot run's instance found gone with no end reported: relaunched, or ended
    /// interrupted (the relaunches used up) in one transaction. `None`: the run is not
    /// one to relaunch (or already ended).
    pub fn relaunch_gone(
        &self,
        run: &RunId,
        instance: &InstanceName,
        now_ms: u64,
    ) -> anyhow::Result<Option<Result<Relaunch, String>>> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let state: String = tx.query_row(
            "SELECT state FROM runs WHERE id = ?1",
            [run.as_str()],
            |r| r.get(0),
        )?;
        if parse::<RunState>(&state)?.is_terminal() {
            return Ok(None);
        }
        let interruption = crate::relaunch::Interruption::Gone {
            instance: instance.to_string(),
            at_ms: now_ms,
        };
        let decided = decide_relaunch(&tx, run, interruption)?;
        match &decided {
            Some(Ok(_)) => {
                tx.execute(
                    "UPDATE runs SET state = 'pending' WHERE id = ?1",
                    [run.as_str()],
                )?;
            }
            Some(Err(error)) => {
                tx.execute(
                    "UPDATE runs SET state = 'interrupted', ended_ms = COALESCE(ended_ms, ?2), error = COALESCE(error, ?3) WHERE id = ?1",
                    params![run.as_str(), now_ms, error],
                )?;
            }
            None => {}
        }
        tx.commit()?;
        Ok(decided)
    }

    /// Records that node `node` of `run` now runs on `to` as incarnation `incarnation`,
    /// having run on `from` as the one before: `to` becomes the run's (node 0's) instance.
    pub fn relaunched(
        &self,
        run: &RunId,
        node: u32,
        incarnation: u32,
        from: &InstanceName,
        to: &InstanceName,
    ) -> anyhow::Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO run_incarnations (run_id, instance, node, incarnation) VALUES (?1, ?2, ?3, ?4)",
            params![run.as_str(), from.as_str(), node, incarnation - 1],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO run_incarnations (run_id, instance, node, incarnation) VALUES (?1, ?2, ?3, ?4)",
            params![run.as_str(), to.as_str(), node, incarnation],
        )?;
        if node == 0 {
            tx.execute(
                "UPDATE runs SET instance = ?2 WHERE id = ?1",
                params![run.as_str(), to.as_str()],
            )?;
        }
        tx.execute(
            "UPDATE run_nodes SET instance = ?3 WHERE run_id = ?1 AND node = ?2",
            params![run.as_str(), node, to.as_str()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Spot runs still going whose relaunch was decided (counted) but not made, with the
    /// replacement's number, and those that are not waiting for one: each with its
    /// current instances (a gang's, in node order).
    pub fn relaunch_runs(&self) -> anyhow::Result<Vec<SpotRun>> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT s.run_id, r.instance, s.start, s.relaunches,
                    COALESCE((SELECT MAX(i.incarnation) FROM run_incarnations i WHERE i.run_id = s.run_id AND i.node = 0), 0)
             FROM run_starts s JOIN runs r ON r.id = s.run_id
             WHERE r.state NOT IN ('succeeded', 'failed', 'stopped', 'interrupted', 'budget_exceeded')",
        )?;
        let rows: Vec<(String, String, String, u32, u32)> = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        let mut nodes =
            conn.prepare_cached("SELECT instance FROM run_nodes WHERE run_id = ?1 ORDER BY node")?;
        let mut runs = Vec::new();
        for (run, instance, start, relaunches, incarnation) in rows {
            let start: StoredStart = serde_json::from_str(&start)?;
            if start.on_interrupt == crate::relaunch::OnInterrupt::End {
                continue;
            }
            let pending = (relaunches > incarnation).then_some(relaunches);
            let mut instances: Vec<String> = nodes
                .query_map([run.as_str()], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            if instances.is_empty() {
                instances.push(instance);
            }
            let instances = instances
                .iter()
                .map(|i| parse(i))
                .collect::<Result<_, _>>()?;
            runs.push((parse(&run)?, instances, pending));
        }
        Ok(runs)
    }

    /// Whether `run` waits for a relaunch decided but not made.
    pub fn relaunch_pending(&self, run: &RunId) -> anyhow::Result<bool> {
        let conn = self.lock();
        let relaunches: Option<u32> = conn
            .query_row(
                "SELECT relaunches FROM run_starts WHERE run_id = ?1",
                [run.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(relaunches.unwrap_or(0) > current_incarnation(&conn, run, 0)?)
    }

    /// The highest sequence number stored from `source`: what to ask its agent to replay
    /// after.
    pub fn last_seq(&self, run: &RunId, source: Source) -> anyhow::Result<u64> {
        last_seq_of(&self.lock(), run, source)
    }

    /// Ended runs whose logs are still whole, with what `retention::due` decides on.
    pub fn uncompacted_runs(&self) -> anyhow::Result<Vec<(RunId, crate::retention::Facts)>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT id, state, ended_ms FROM runs WHERE compacted_ms IS NULL AND ended_ms IS NOT NULL",
        )?;
        let rows = stmt
            .query_map([], |r| {
                let id: String = r.get(0)?;
                let state: String = r.get(1)?;
                Ok((
                    parse(&id)?,
                    crate::retention::Facts {
                        state: parse(&state)?,
                        ended_ms: r.get(2)?,
                    },
                ))
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Compacts `run`'s log (see `retention`): its output and progress lines before its
    /// last `tail` output lines are deleted, and a `Notice::Compacted` saying how many takes
    /// the place of the last of them. Returns the lines deleted.
    pub fn compact_run(
        &self,
        run: &RunId,
        tail: u64,
        keep_days: u32,
        now_ms: u64,
    ) -> anyhow::Result<u64> {
        const SHOWN_ONLY: &str = "(kind LIKE '{\"output\":%' OR kind LIKE '{\"progress\":%')";
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let first_kept: Option<u64> = tx
            .query_row(
                "SELECT shown FROM run_events WHERE run_id = ?1 AND kind LIKE '{\"output\":%' ORDER BY shown DESC LIMIT 1 OFFSET ?2",
                params![run.as_str(), tail.saturating_sub(1)],
                |r| r.get(0),
            )
            .optional()?;
        let mut removed = 0;
        if let Some(first_kept) = first_kept {
            let (count, last): (u64, Option<u64>) = tx.query_row(
                &format!("SELECT COUNT(*), MAX(shown) FROM run_events WHERE run_id = ?1 AND shown < ?2 AND {SHOWN_ONLY}"),
                params![run.as_str(), first_kept],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if let Some(last) = last {
                tx.execute(
                    &format!(
                        "DELETE FROM run_events WHERE run_id = ?1 AND shown < ?2 AND {SHOWN_ONLY}"
                    ),
                    params![run.as_str(), first_kept],
                )?;
                let notice = protocol::EventKind::Notice(protocol::Notice::Compacted {
                    lines: count,
                    keep_days,
                });
                // Sequence 0 of node 0's first incarnation: no agent numbers an event 0.
                tx.execute(
                    "INSERT INTO run_events (run_id, shown, node, incarnation, seq, at_ms, kind) VALUES (?1, ?2, 0, 0, 0, ?3, ?4)",
                    params![run.as_str(), last, now_ms, serde_json::to_string(&notice)?],
                )?;
                removed = count;
            }
        }
        tx.execute(
            "UPDATE runs SET compacted_ms = ?2 WHERE id = ?1",
            params![run.as_str(), now_ms],
        )?;
        tx.commit()?;
        Ok(removed)
    }

    /// The notice a compacted run's log holds in place of its removed lines.
    pub fn compaction_notice(&self, run: &RunId) -> anyhow::Result<Option<RunEvent>> {
        let conn = self.read();
        let found: Option<(u64, u64, String)> = conn
            .query_row(
                "SELECT shown, at_ms, kind FROM run_events WHERE run_id = ?1 AND node = 0 AND incarnation = 0 AND seq = 0",
                [run.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        found
            .map(|(seq, at_ms, kind)| {
                Ok(RunEvent {
                    seq,
                    at_ms,
                    kind: serde_json::from_str(&kind)?,
                })
            })
            .transpose()
    }

    /// Where to start showing a run's events (a `shown` number): after the one before the
    /// first event at or after `since_ms`, and before the last `tail` output lines.
    pub fn start_after(
        &self,
        run: &RunId,
        since_ms: Option<u64>,
        tail: Option<u64>,
    ) -> anyhow::Result<u64> {
        let conn = self.read();
        let mut after = 0u64;
        if let Some(since) = since_ms {
            let first: Option<u64> = conn.query_row(
                "SELECT MIN(shown) FROM run_events WHERE run_id = ?1 AND at_ms >= ?2",
                params![run.as_str(), since],
                |r| r.get(0),
            )?;
            after = match first {
                Some(first) => first - 1,
                None => conn.query_row(
                    "SELECT COALESCE(MAX(shown), 0) FROM run_events WHERE run_id = ?1",
                    [run.as_str()],
                    |r| r.get(0),
                )?,
            };
        }
        if let Some(n) = tail {
            let nth_last: Option<u64> = if n == 0 {
                conn.query_row(
                    "SELECT MAX(shown) FROM run_events WHERE run_id = ?1",
                    [run.as_str()],
                    |r| r.get(0),
                )?
            } else {
                conn.query_row(
                    "SELECT shown FROM run_events WHERE run_id = ?1 AND kind LIKE '{\"output\":%' ORDER BY shown DESC LIMIT 1 OFFSET ?2",
                    params![run.as_str(), n - 1],
                    |r| r.get(0),
                )
                .optional()?
                .map(|seq: u64| seq - 1)
            };
            after = after.max(nth_last.unwrap_or(0));
        }
        Ok(after)
    }

    /// Up to `limit` events of `run` after `after_seq` (a `shown` number), in the daemon's
    /// order, numbered by it.
    pub fn events_after(
        &self,
        run: &RunId,
        after_seq: u64,
        limit: u32,
    ) -> anyhow::Result<Vec<RunEvent>> {
        Ok(self
            .node_events_after(run, after_seq, limit, None)?
            .into_iter()
            .map(|(_, event)| event)
            .collect())
    }

    /// As `events_after`, with the node each event came from; with `only`, that node's
    /// events alone (still numbered in the daemon's order across the run).
    pub fn node_events_after(
        &self,
        run: &RunId,
        after_seq: u64,
        limit: u32,
        only: Option<u32>,
    ) -> anyhow::Result<Vec<(u32, RunEvent)>> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT shown, at_ms, kind, node FROM run_events WHERE run_id = ?1 AND shown > ?2 AND (?4 IS NULL OR node = ?4) ORDER BY shown LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(params![run.as_str(), after_seq, limit, only], |r| {
                let kind: String = r.get(2)?;
                Ok((
                    r.get(3)?,
                    RunEvent {
                        seq: r.get(0)?,
                        at_ms: r.get(1)?,
                        kind: parse_json(&kind)?,
                    },
                ))
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}

/// The body of `Db::insert_events`, on a transaction or savepoint the caller commits.
fn insert_events_in(
    tx: &Connection,
    run: &RunId,
    source: Source,
    events: &[RunEvent],
) -> anyhow::Result<Stored> {
    let held: Held = tx.query_row(
        "SELECT state, spot_notice, budget_notice, exit IS NOT NULL FROM runs WHERE id = ?1",
        [run.as_str()],
        |r| {
            let state: String = r.get(0)?;
            Ok(Held {
                state: parse(&state)?,
                notices: run_state::Notices {
                    spot: r.get(1)?,
                    budget: r.get(2)?,
                },
                ended: r.get(3)?,
            })
        },
    )?;
    let mut fresh = Vec::with_capacity(events.len());
    {
        let mut shown: u64 = tx.query_row(
            "SELECT COALESCE(MAX(shown), 0) FROM run_events WHERE run_id = ?1",
            [run.as_str()],
            |r| r.get(0),
        )?;
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO run_events (run_id, shown, node, incarnation, seq, at_ms, kind) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for event in events {
            let stored = insert.execute(params![
                run.as_str(),
                shown + 1,
                source.node,
                source.incarnation,
                event.seq,
                event.at_ms,
                serde_json::to_string(&event.kind)?
            ])?;
            // A replayed event already moved the state when it first came.
            if stored == 1 {
                shown += 1;
                fresh.push(event.clone());
            }
        }
    }
    // A gang's nodes each end; the run ends (or starts again) when the gang says.
    let nodes: u32 = tx.query_row(
        "SELECT COUNT(*) FROM run_nodes WHERE run_id = ?1",
        [run.as_str()],
        |r| r.get(0),
    )?;
    // An end from an instance the run has been relaunched from ends nothing now.
    if source.incarnation < current_incarnation(tx, run, source.node)? {
        fresh.retain(|e| !matches!(e.kind, protocol::EventKind::Ended(_)));
    }
    let mut node_end = None;
    if nodes > 1 {
        // The node's attempt, and the gang's (1 until it restarts or is relaunched).
        let (stored_attempt, gang_attempt): (u32, u32) = tx.query_row(
            "SELECT attempt, COALESCE((SELECT restarts + relaunches FROM run_starts WHERE run_id = ?1), 0) + 1
             FROM run_nodes WHERE run_id = ?1 AND node = ?2",
            params![run.as_str(), source.node],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let mut attempt = stored_attempt;
        fresh.retain(|e| match &e.kind {
            protocol::EventKind::Notice(protocol::Notice::StartedAgain { attempt: a, .. }) => {
                attempt = *a;
                true
            }
            // An earlier attempt's end, come late, ends nothing now.
            protocol::EventKind::Ended(end) => {
                if attempt == gang_attempt {
                    node_end = Some((end.clone(), e.at_ms));
                }
                false
            }
            _ => true,
        });
        if attempt != stored_attempt {
            tx.execute(
                "UPDATE run_nodes SET attempt = ?3 WHERE run_id = ?1 AND node = ?2",
                params![run.as_str(), source.node, attempt],
            )?;
        }
    }
    let mut change = run_state::apply(held, &fresh);
    let mut relaunch = None;
    if change.state == RunState::Interrupted
        && let Some(ended) = &mut change.end
    {
        let instance: String = tx.query_row(
            "SELECT instance FROM runs WHERE id = ?1",
            [run.as_str()],
            |r| r.get(0),
        )?;
        let interruption = crate::relaunch::Interruption::Notice {
            instance,
            at_ms: ended.at_ms,
        };
        match decide_relaunch(tx, run, interruption)? {
            Some(Ok(next)) => {
                relaunch = Some(next);
                change.end = None;
                change.state = RunState::Pending;
            }
            Some(Err(error)) => ended.error = Some(error),
            None => {}
        }
    }
    let mut restart = None;
    if let Some((end, at_ms)) = node_end {
        tx.execute(
            "UPDATE run_nodes SET end_kind = ?3, end_ms = ?4 WHERE run_id = ?1 AND node = ?2 AND end_kind IS NULL",
            params![run.as_str(), source.node, serde_json::to_string(&end)?, at_ms],
        )?;
        if let crate::gang::Step::End(last) = crate::gang::step(nodes, &node_ends_of(tx, run)?)
            && !held.ended
        {
            restart = restart_gang(tx, run, &last, change.notices)?;
            let state = RunState::after(&last.end, change.notices);
            let mut error = crate::gang::error(&last);
            if restart.is_none() && state == RunState::Interrupted {
                // The whole gang is relaunched (`--on-interrupt relaunch`).
                let interruption = crate::relaunch::Interruption::Notice {
                    instance: noticed_instance(tx, run)?,
                    at_ms: last.at_ms,
                };
                match decide_relaunch(tx, run, interruption)? {
                    Some(Ok(next)) => {
                        relaunch = Some(next);
                        change.state = RunState::Pending;
                    }
                    Some(Err(why)) => error = Some(why),
                    None => {}
                }
            }
            if restart.is_none() && relaunch.is_none() {
                change.state = state;
                change.end = Some(run_state::Ended {
                    error,
                    end: last.end,
                    at_ms: last.at_ms,
                });
            }
        }
    }
    tx.execute(
        "UPDATE runs SET state = ?2, spot_notice = ?3, budget_notice = ?4, started_ms = COALESCE(started_ms, ?5) WHERE id = ?1",
        params![
            run.as_str(),
            text(&change.state),
            change.notices.spot,
            change.notices.budget,
            change.started_ms
        ],
    )?;
    let mut new_state = None;
    if let Some(ended) = change.end {
        tx.execute(
            "UPDATE runs SET ended_ms = COALESCE(ended_ms, ?2), exit = ?3, error = COALESCE(error, ?4) WHERE id = ?1",
            params![run.as_str(), ended.at_ms, serde_json::to_string(&ended.end)?, ended.error],
        )?;
        new_state = Some(change.state);
    }
    let last_seq = last_seq_of(tx, run, source)?;
    Ok(Stored {
        last_seq,
        ended: new_state,
        restart,
        relaunch,
    })
}

/// The incarnation node `node` of `run` runs in now (0 until it is relaunched).
fn current_incarnation(conn: &Connection, run: &RunId, node: u32) -> anyhow::Result<u32> {
    Ok(conn.query_row(
        "SELECT COALESCE(MAX(incarnation), 0) FROM run_incarnations WHERE run_id = ?1 AND node = ?2",
        params![run.as_str(), node],
        |r| r.get(0),
    )?)
}

/// An interrupted run's next step under its `--on-interrupt` (`relaunch::decide`): a
/// relaunch (counted here), or its end with the reason. `None`: nothing kept for it (an
/// ordinary interrupted run).
fn decide_relaunch(
    tx: &Connection,
    run: &RunId,
    interruption: crate::relaunch::Interruption,
) -> anyhow::Result<Option<Result<Relaunch, String>>> {
    let row: Option<(String, u32)> = tx
        .query_row(
            "SELECT start, relaunches FROM run_starts WHERE run_id = ?1",
            [run.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((start, relaunches)) = row else {
        return Ok(None);
    };
    let start: StoredStart = serde_json::from_str(&start)?;
    Ok(
        match crate::relaunch::decide(start.on_interrupt, relaunches) {
            crate::relaunch::Decision::Relaunch { number } => {
                tx.execute(
                    "UPDATE run_starts SET relaunches = ?2 WHERE run_id = ?1",
                    params![run.as_str(), number],
                )?;
                // A gang's next attempt starts with no node ended.
                tx.execute(
                    "UPDATE run_nodes SET end_kind = NULL, end_ms = NULL WHERE run_id = ?1",
                    [run.as_str()],
                )?;
                Some(Ok(Relaunch {
                    number,
                    interruption,
                }))
            }
            crate::relaunch::Decision::End { error: Some(error) } => Some(Err(error)),
            crate::relaunch::Decision::End { error: None } => None,
        },
    )
}

/// The instance of the node whose spot notice came last (a gang's, when it ends
/// interrupted); the run's own when none is stored. Read from the log's end backwards,
/// where the notice is.
fn noticed_instance(tx: &Connection, run: &RunId) -> anyhow::Result<String> {
    let noticed: Option<String> = tx
        .query_row(
            "SELECT n.instance FROM run_events e JOIN run_nodes n ON n.run_id = e.run_id AND n.node = e.node
             WHERE e.run_id = ?1 AND e.kind LIKE '{\"notice\":{\"spot_interruption\"%'
             ORDER BY e.shown DESC LIMIT 1",
            [run.as_str()],
            |r| r.get(0),
        )
        .optional()?;
    match noticed {
        Some(instance) => Ok(instance),
        None => Ok(tx.query_row(
            "SELECT instance FROM runs WHERE id = ?1",
            [run.as_str()],
            |r| r.get(0),
        )?),
    }
}

/// A gang's restart history and policy, read when its restart is decided.
struct GangHistory {
    history: protocol::restart::History,
    attempt_ms: u64,
    policy: Option<protocol::RestartPolicy>,
}

fn gang_history(conn: &Connection, run: &RunId) -> anyhow::Result<GangHistory> {
    let row: Option<(String, u32, u32, u64)> = conn
        .query_row(
            "SELECT start, restarts, quick_failures, attempt_ms FROM run_starts WHERE run_id = ?1",
            [run.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    Ok(match row {
        Some((start, restarts, quick_failures, attempt_ms)) => {
            let start: StoredStart = serde_json::from_str(&start)?;
            GangHistory {
                history: protocol::restart::History {
                    restarts,
                    quick_failures,
                },
                attempt_ms,
                policy: Some(start.spec.restart),
            }
        }
        None => GangHistory {
            history: Default::default(),
            attempt_ms: 0,
            policy: None,
        },
    })
}

/// After every node of a gang ended with `last` as the run's end: whether the gang starts
/// again (`gang::restart`); if so its nodes' ends are cleared and the restart counted.
fn restart_gang(
    tx: &Connection,
    run: &RunId,
    last: &crate::gang::NodeEnd,
    notices: run_state::Notices,
) -> anyhow::Result<Option<crate::gang::Restart>> {
    let mut gang = gang_history(tx, run)?;
    let Some(policy) = gang.policy else {
        return Ok(None);
    };
    let ran_for = std::time::Duration::from_millis(last.at_ms.saturating_sub(gang.attempt_ms));
    let Some(mut restart) = crate::gang::restart(policy, last, notices, ran_for, &mut gang.history)
    else {
        return Ok(None);
    };
    tx.execute(
        "UPDATE run_nodes SET end_kind = NULL, end_ms = NULL WHERE run_id = ?1",
        [run.as_str()],
    )?;
    tx.execute(
        "UPDATE run_starts SET restarts = ?2, quick_failures = ?3 WHERE run_id = ?1",
        params![
            run.as_str(),
            gang.history.restarts,
            gang.history.quick_failures
        ],
    )?;
    // Relaunches moved the gang's attempts on too.
    restart.attempt = gang_attempt_of(tx, run)?;
    Ok(Some(restart))
}

/// `Db::gang_attempt` within a transaction.
fn gang_attempt_of(conn: &Connection, run: &RunId) -> anyhow::Result<u32> {
    Ok(conn
        .query_row(
            "SELECT restarts + relaunches + 1 FROM run_starts WHERE run_id = ?1",
            [run.as_str()],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(1))
}

fn node_ends_of(conn: &Connection, run: &RunId) -> anyhow::Result<Vec<crate::gang::NodeEnd>> {
    let mut stmt = conn.prepare_cached(
        "SELECT node, end_kind, end_ms FROM run_nodes WHERE run_id = ?1 AND end_kind IS NOT NULL ORDER BY node",
    )?;
    let rows = stmt
        .query_map([run.as_str()], |r| {
            let end: String = r.get(1)?;
            Ok(crate::gang::NodeEnd {
                node: r.get(0)?,
                end: parse_json(&end)?,
                at_ms: r.get(2)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

fn last_seq_of(conn: &Connection, run: &RunId, source: Source) -> anyhow::Result<u64> {
    Ok(conn.query_row(
        "SELECT COALESCE(MAX(seq), 0) FROM run_events WHERE run_id = ?1 AND node = ?2 AND incarnation = ?3",
        params![run.as_str(), source.node, source.incarnation],
        |r| r.get(0),
    )?)
}

const RUN_SELECT: &str = "SELECT id, instance, argv, workdir, state, created_ms, started_ms, ended_ms, exit, error FROM runs";

fn instance_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<InstanceRow> {
    let name: String = r.get(0)?;
    let state: String = r.get(2)?;
    let for_run: Option<String> = r.get(6)?;
    Ok(InstanceRow {
        name: parse(&name)?,
        provider: r.get(1)?,
        state: parse(&state)?,
        created_ms: r.get(3)?,
        terminated_ms: r.get(4)?,
        pid: r.get(5)?,
        for_run: for_run.map(|s| parse(&s)).transpose()?,
    })
}

fn cloud_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CloudRow> {
    let name: String = r.get(0)?;
    Ok(CloudRow {
        name: parse(&name)?,
        cloud_id: r.get(1)?,
        region: r.get(2)?,
        instance_type: r.get(3)?,
        spot: r.get(4)?,
        price_per_hour: r.get(5)?,
        accrued_ms: r.get(6)?,
        running_since_ms: r.get(7)?,
        cluster: r.get(8)?,
    })
}

fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    let id: String = r.get(0)?;
    let instance: String = r.get(1)?;
    let argv: String = r.get(2)?;
    let state: String = r.get(4)?;
    let exit: Option<String> = r.get(8)?;
    Ok(RunRow {
        id: parse(&id)?,
        instance: parse(&instance)?,
        argv: parse_json(&argv)?,
        root: r.get(3)?,
        state: parse(&state)?,
        created_ms: r.get(5)?,
        started_ms: r.get(6)?,
        ended_ms: r.get(7)?,
        exit: exit.map(|e| parse_json(&e)).transpose()?,
        error: r.get(9)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::EventKind;

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&dir.path().join("state.db")).expect("open");
        (dir, db)
    }

    fn name(s: &str) -> InstanceName {
        s.parse().expect("valid name")
    }

    #[test]
    fn a_version_2_database_gains_cloud_instances() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(&format!(
                "{SCHEMA_V1} {MIGRATE_1_TO_2} PRAGMA user_version = 2;"
            ))
            .expect("a version 2 database");
        }
        let db = Db::open(&path).expect("upgrade");
        let row = CloudRow {
            name: name("ec2-1"),
            cloud_id: "i-0123456789abcdef0".into(),
            region: "us-east-1".into(),
            instance_type: "g5.xlarge".into(),
            spot: false,
            price_per_hour: Some(1.0),
            accrued_ms: 0,
            running_since_ms: Some(1_000),
            cluster: None,
        };
        db.insert_cloud(&row).expect("insert");
        assert_eq!(db.cloud(&name("ec2-1")).expect("read"), Some(row));
        drop(db);
        Db::open(&path).expect("a current database opens as is");
    }

    #[test]
    fn a_version_3_database_keeps_its_instances_and_learns_spot_notices() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let notice =
            serde_json::to_string(&EventKind::Notice(protocol::Notice::SpotInterruption {
                action: "terminate".into(),
                time: "2026-11-28T08:22:00Z".into(),
                signal: 15,
            }))
            .expect("json");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(&format!(
                "{SCHEMA_V1} {MIGRATE_1_TO_2} {MIGRATE_2_TO_3} PRAGMA user_version = 3;"
            ))
            .expect("a version 3 database");
            conn.execute(
                "INSERT INTO instances (name, provider, state, created_ms) VALUES ('ec2-1', 'ec2', 'running', 1)",
                [],
            )
            .expect("instance");
            for id in ["run-00000000000a", "run-00000000000b"] {
                conn.execute(
                    "INSERT INTO runs (id, instance, argv, workdir, state, created_ms) VALUES (?1, 'ec2-1', '[]', '/p', 'running', 1)",
                    [id],
                )
                .expect("run");
            }
            conn.execute(
                "INSERT INTO run_events (run_id, seq, at_ms, kind) VALUES ('run-00000000000a', 0, 5, ?1)",
                [&notice],
            )
            .expect("event");
        }
        let db = Db::open(&path).expect("upgrade");
        let row = db.instance(&name("ec2-1")).expect("read").expect("kept");
        assert_eq!(row.provider, ProviderKind::Ec2);
        let killed = |id: &str| {
            let id: RunId = id.parse().expect("run id");
            db.insert_events(
                &id,
                Source::default(),
                &[RunEvent {
                    seq: 1,
                    at_ms: 9,
                    kind: EventKind::Ended(RunEnd::Signaled {
                        signal: 15,
                        stop_requested: false,
                    }),
                }],
            )
            .expect("end");
            db.run(&id).expect("read").expect("run").state
        };
        // The notice stored before the upgrade still makes the kill an interruption.
        assert_eq!(killed("run-00000000000a"), RunState::Interrupted);
        assert_eq!(killed("run-00000000000b"), RunState::Failed);
        // The provider column admits only known providers now.
        let conn = Connection::open(&path).expect("open");
        assert!(conn
            .execute(
                "INSERT INTO instances (name, provider, state, created_ms) VALUES ('x-1', 'gcp', 'running', 1)",
                [],
            )
            .is_err());
    }

    #[test]
    fn a_clusters_live_members_are_those_of_its_id_not_yet_terminated() {
        let (_dir, db) = db();
        for (pod, cluster) in [
            ("runpod-aaaaa0", Some("cluster_1")),
            ("runpod-aaaaa1", Some("cluster_1")),
            ("runpod-bbbbb0", Some("cluster_2")),
            ("runpod-ccccc0", None),
        ] {
            db.insert_instance(&InstanceRow {
                name: name(pod),
                provider: ProviderKind::Runpod,
                state: InstanceState::Running,
                created_ms: 0,
                terminated_ms: None,
                pid: None,
                for_run: None,
            })
            .expect("instance");
            let row = CloudRow {
                name: name(pod),
                cloud_id: format!("pod{pod}").replace('-', ""),
                region: "US-TX-3".into(),
                instance_type: "NVIDIA A100 80GB PCIe x1".into(),
                spot: false,
                price_per_hour: Some(1.64),
                accrued_ms: 0,
                running_since_ms: Some(0),
                cluster: cluster.map(str::to_owned),
            };
            db.insert_cloud(&row).expect("cloud");
            assert_eq!(db.cloud(&name(pod)).expect("read"), Some(row));
        }
        let live = |c| db.live_cluster_members(c).expect("members");
        assert_eq!(
            live("cluster_1"),
            [name("runpod-aaaaa0"), name("runpod-aaaaa1")]
        );
        db.set_instance_state(&name("runpod-aaaaa0"), InstanceState::Terminated, 5)
            .expect("terminated");
        assert_eq!(live("cluster_1"), [name("runpod-aaaaa1")]);
        assert_eq!(live("cluster_2"), [name("runpod-bbbbb0")]);
        assert!(live("cluster_3").is_empty());
    }

    #[test]
    fn billed_time_pauses_while_stopped() {
        let (_dir, db) = db();
        let hour = 3_600_000;
        db.insert_cloud(&CloudRow {
            name: name("ec2-1"),
            cloud_id: "i-0123456789abcdef0".into(),
            region: "us-east-1".into(),
            instance_type: "g5.xlarge".into(),
            spot: false,
            price_per_hour: Some(2.0),
            accrued_ms: 0,
            running_since_ms: Some(0),
            cluster: None,
        })
        .expect("insert");
        db.set_cloud_running(&name("ec2-1"), false, hour)
            .expect("stop");
        // Stopping twice bills nothing more.
        db.set_cloud_running(&name("ec2-1"), false, 5 * hour)
            .expect("stop again");
        db.set_cloud_running(&name("ec2-1"), true, 10 * hour)
            .expect("start");
        let row = db.cloud(&name("ec2-1")).expect("read").expect("row");
        assert_eq!(row.billed_ms(10 * hour + hour / 2), hour + hour / 2);
        assert_eq!(row.cost(10 * hour + hour / 2), Some(3.0));
        assert_eq!(db.take_setting("x").expect("take"), None);
        db.set_setting("x", "1").expect("set");
        assert_eq!(db.take_setting("x").expect("take").as_deref(), Some("1"));
        assert_eq!(db.take_setting("x").expect("take"), None);
    }

    #[test]
    fn tokens_are_single_use_and_expire() {
        let (_dir, db) = db();
        let token = db.mint_token(&name("gpu-1"), 1_000).expect("mint");
        assert_eq!(
            db.consume_token(&token, 999).expect("db"),
            Ok(name("gpu-1"))
        );
        assert_eq!(
            db.consume_token(&token, 999).expect("db"),
            Err(TokenRefusal::Reused)
        );
        let late = db.mint_token(&name("gpu-1"), 1_000).expect("mint");
        assert_eq!(
            db.consume_token(&late, 1_000).expect("db"),
            Err(TokenRefusal::Expired)
        );
        let unknown = EnrollToken::from_random([9; 32]);
        assert_eq!(
            db.consume_token(&unknown, 0).expect("db"),
            Err(TokenRefusal::Unknown)
        );
    }

    #[test]
    fn revocation_covers_certs_and_unused_tokens() {
        let (_dir, db) = db();
        let fp = Fingerprint::of_der(b"cert");
        db.record_cert(fp, &name("gpu-1"), 5).expect("record");
        let token = db.mint_token(&name("gpu-1"), 1_000).expect("mint");
        assert_eq!(db.cert(fp).expect("db"), Some((name("gpu-1"), false)));
        assert_eq!(db.revoke_instance(&name("gpu-1"), 6).expect("revoke"), 1);
        assert_eq!(db.cert(fp).expect("db"), Some((name("gpu-1"), true)));
        assert!(db.consume_token(&token, 7).expect("db").is_err());
    }

    #[test]
    fn events_are_stored_once_and_end_the_run() {
        let (_dir, db) = db();
        let run = RunId::from_random([1; 6]);
        running(&db, &run);
        let out = |seq: u64| line(seq, &seq.to_string());
        assert_eq!(
            db.insert_events(&run, Source::default(), &[out(1), out(2)])
                .expect("insert"),
            Stored {
                last_seq: 2,
                ..Stored::default()
            }
        );
        let end = RunEvent {
            seq: 3,
            at_ms: 3,
            kind: EventKind::Ended(RunEnd::Exited {
                code: 2,
                stop_requested: false,
            }),
        };
        assert_eq!(
            db.insert_events(&run, Source::default(), &[out(2), end.clone()])
                .expect("insert"),
            Stored {
                last_seq: 3,
                ended: Some(RunState::Failed),
                restart: None,
                relaunch: None,
            }
        );
        assert_eq!(
            db.insert_events(&run, Source::default(), &[end])
                .expect("replay")
                .ended,
            None,
            "ending twice is a no-op"
        );
        let seqs: Vec<u64> = db
            .events_after(&run, 0, 100)
            .expect("read")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        let row = db.run(&run).expect("db").expect("exists");
        assert_eq!(row.state, RunState::Failed);
        assert!(
            !db.set_run_state(&run, RunState::Running, 9, None)
                .expect("db"),
            "terminal states stick"
        );
    }

    /// A run row for `run` on local-1, running.
    fn running(db: &Db, run: &RunId) {
        db.insert_run(&RunRow {
            id: run.clone(),
            instance: name("local-1"),
            argv: vec!["true".into()],
            root: "/w".into(),
            state: RunState::Running,
            created_ms: 1,
            started_ms: None,
            ended_ms: None,
            exit: None,
            error: None,
        })
        .expect("insert");
    }

    fn line(seq: u64, text: &str) -> RunEvent {
        RunEvent {
            seq,
            at_ms: seq,
            kind: EventKind::Output {
                stream: protocol::Stream::Stdout,
                line: text.into(),
            },
        }
    }

    /// A plain spec of `run` (`true`) with `restart` and `end`.
    fn spec_of(
        run: &RunId,
        restart: protocol::RestartPolicy,
        end: protocol::EndAction,
    ) -> protocol::RunSpec {
        protocol::RunSpec {
            run: run.clone(),
            argv: vec!["true".into()],
            env: vec![],
            cwd: String::new(),
            setup: protocol::Setup::Skip,
            restart,
            stop_grace_ms: 1000,
            end,
            spot_signal: 15,
            storage: None,
            data: vec![],
            pull_alongside: false,
            checkpoints: None,
            resume_from: None,
        }
    }

    #[test]
    fn a_gang_under_a_restart_policy_starts_again_and_a_late_end_ends_nothing() {
        let (_dir, db) = db();
        let run = RunId::from_random([8; 6]);
        running(&db, &run);
        db.insert_run_nodes(&run, &[name("local-1"), name("local-2")])
            .expect("nodes");
        let spec = spec_of(
            &run,
            protocol::RestartPolicy::OnFailure { max_restarts: 1 },
            protocol::EndAction::Keep,
        );
        let start = StoredStart {
            spec,
            launch: None,
            all_checkpoints: false,
            secret_names: vec!["HF_TOKEN".into()],
            on_interrupt: crate::relaunch::OnInterrupt::End,
            launch_options: None,
        };
        db.set_run_start(&run, &start, 0).expect("start");
        assert_eq!(db.run_start(&run).expect("db"), Some(start));
        let node = |node| Source {
            node,
            incarnation: 0,
        };
        let event = |seq, kind| RunEvent {
            seq,
            at_ms: 100 * seq,
            kind,
        };
        let lost = EventKind::Ended(RunEnd::Lost {
            message: "its agent died".into(),
        });
        let stopped = EventKind::Ended(RunEnd::Signaled {
            signal: 15,
            stop_requested: true,
        });
        let again = || {
            EventKind::Notice(protocol::Notice::StartedAgain {
                attempt: 2,
                cause: "node 1: its agent died".into(),
            })
        };
        let success = EventKind::Ended(RunEnd::Exited {
            code: 0,
            stop_requested: false,
        });
        db.insert_events(&run, node(1), &[event(1, lost.clone())])
            .expect("node 1");
        let stored = db
            .insert_events(&run, node(0), &[event(1, stopped.clone())])
            .expect("node 0");
        assert_eq!(stored.ended, None, "the gang starts again");
        let restart = stored.restart.expect("a restart");
        assert_eq!(
            (restart.attempt, restart.cause.as_str()),
            (2, "node 1: its agent died")
        );
        assert_eq!(db.node_ends(&run).expect("db"), vec![], "ends cleared");
        assert_eq!(db.pending_restarts().expect("db"), vec![(run.clone(), 2)]);
        // Node 1's agent, come back, ends its first attempt again under a number of its
        // own: that end is of attempt 1 and ends nothing now.
        let late = db
            .insert_events(&run, node(1), &[event(2, lost.clone())])
            .expect("late");
        assert_eq!((late.ended, late.restart), (None, None));
        assert_eq!(db.node_ends(&run).expect("db"), vec![]);
        // Attempt 2 on both nodes, and both succeed: the run succeeds.
        db.insert_events(
            &run,
            node(1),
            &[event(3, again()), event(4, success.clone())],
        )
        .expect("node 1, attempt 2");
        assert_eq!(db.pending_restarts().expect("db"), vec![], "begun");
        let done = db
            .insert_events(
                &run,
                node(0),
                &[event(2, again()), event(3, success.clone())],
            )
            .expect("node 0, attempt 2");
        assert_eq!(done.ended, Some(RunState::Succeeded));
        // A second failure after the one restart allowed ends the run.
        let run2 = RunId::from_random([9; 6]);
        running(&db, &run2);
        db.insert_run_nodes(&run2, &[name("local-3"), name("local-4")])
            .expect("nodes");
        let mut start2 = db.run_start(&run).expect("db").expect("start");
        start2.spec.run = run2.clone();
        db.set_run_start(&run2, &start2, 0).expect("start");
        db.insert_events(&run2, node(1), &[event(1, lost.clone())])
            .expect("1");
        let first = db
            .insert_events(&run2, node(0), &[event(1, stopped.clone())])
            .expect("0");
        assert!(first.restart.is_some());
        db.insert_events(&run2, node(1), &[event(2, again()), event(3, lost)])
            .expect("1 again");
        let second = db
            .insert_events(&run2, node(0), &[event(2, again()), event(3, stopped)])
            .expect("0 again");
        assert_eq!(
            (second.ended, second.restart),
            (Some(RunState::Failed), None)
        );
    }

    #[test]
    fn a_spot_gang_is_relaunched_whole_and_the_old_instances_ends_end_nothing() {
        let (_dir, db) = db();
        let run = RunId::from_random([10; 6]);
        running(&db, &run);
        db.insert_run_nodes(&run, &[name("ec2-a0"), name("ec2-a1")])
            .expect("nodes");
        let spec = spec_of(
            &run,
            protocol::RestartPolicy::Never,
            protocol::EndAction::Terminate,
        );
        db.set_run_start(
            &run,
            &StoredStart {
                spec,
                launch: None,
                all_checkpoints: false,
                secret_names: vec![],
                on_interrupt: crate::relaunch::OnInterrupt::Relaunch { max: 1 },
                launch_options: None,
            },
            0,
        )
        .expect("start");
        let at = |node, incarnation| Source { node, incarnation };
        let event = |seq, kind| RunEvent {
            seq,
            at_ms: 100 * seq,
            kind,
        };
        let notice = || {
            EventKind::Notice(protocol::Notice::SpotInterruption {
                action: "terminate".into(),
                time: "soon".into(),
                signal: 15,
            })
        };
        let signalled = |stop_requested| {
            EventKind::Ended(RunEnd::Exited {
                code: 143,
                stop_requested,
            })
        };
        let again = || {
            EventKind::Notice(protocol::Notice::StartedAgain {
                attempt: 2,
                cause: "a spot interruption".into(),
            })
        };
        let success = EventKind::Ended(RunEnd::Exited {
            code: 0,
            stop_requested: false,
        });
        // Node 1 is taken back; node 0 is stopped with it: the gang is relaunched.
        db.insert_events(
            &run,
            at(1, 0),
            &[event(1, notice()), event(2, signalled(false))],
        )
        .expect("node 1");
        let stored = db
            .insert_events(&run, at(0, 0), &[event(1, signalled(true))])
            .expect("node 0");
        assert_eq!((stored.ended, stored.restart.is_some()), (None, false));
        let next = stored.relaunch.expect("a relaunch");
        assert_eq!(next.number, 1);
        assert!(
            next.interruption.words().contains("of ec2-a1"),
            "the node noticed is named: {}",
            next.interruption.words()
        );
        assert_eq!(db.node_ends(&run).expect("db"), vec![], "ends cleared");
        assert!(db.relaunch_pending(&run).expect("db"));
        assert_eq!(db.pending_restarts().expect("db"), vec![], "no restart");
        assert_eq!(db.gang_attempt(&run).expect("db"), 2);
        // Both nodes move to new instances as incarnation 1.
        for (node, (from, to)) in [("ec2-a0", "ec2-b0"), ("ec2-a1", "ec2-b1")]
            .into_iter()
            .enumerate()
        {
            db.relaunched(&run, node as u32, 1, &name(from), &name(to))
                .expect("relaunched");
        }
        assert!(!db.relaunch_pending(&run).expect("db"));
        let row = db.run(&run).expect("db").expect("run");
        assert_eq!(row.instance, name("ec2-b0"));
        assert_eq!(
            db.run_nodes(&row).expect("db"),
            [name("ec2-b0"), name("ec2-b1")]
        );
        // The old node 0's end, replayed late, ends nothing.
        let late = db
            .insert_events(&run, at(0, 0), &[event(2, success.clone())])
            .expect("late");
        assert_eq!((late.ended, late.relaunch.is_some()), (None, false));
        // The new gang's attempt 2 ends well on both nodes: the run succeeds, the old
        // notice forgotten.
        db.insert_events(
            &run,
            at(1, 1),
            &[event(1, again()), event(2, success.clone())],
        )
        .expect("new node 1");
        let done = db
            .insert_events(&run, at(0, 1), &[event(1, again()), event(2, success)])
            .expect("new node 0");
        assert_eq!(done.ended, Some(RunState::Succeeded));
    }

    #[test]
    fn a_gang_ends_when_every_node_has_with_the_first_failure() {
        let (_dir, db) = db();
        let run = RunId::from_random([7; 6]);
        running(&db, &run);
        db.insert_run_nodes(&run, &[name("local-1"), name("local-2")])
            .expect("nodes");
        let row = db.run(&run).expect("db").expect("run");
        assert_eq!(
            db.run_nodes(&row).expect("nodes"),
            [name("local-1"), name("local-2")]
        );
        assert_eq!(db.node_of(&row, &name("local-2")).expect("db"), Some(1));
        assert_eq!(db.node_of(&row, &name("local-3")).expect("db"), None);
        assert_eq!(db.runs_on(&name("local-2")).expect("db").len(), 1);
        let node = |node| Source {
            node,
            incarnation: 0,
        };
        let ended = |seq, at_ms, end| RunEvent {
            seq,
            at_ms,
            kind: EventKind::Ended(end),
        };
        let failed = RunEnd::Exited {
            code: 3,
            stop_requested: false,
        };
        // Node 1 fails: the run goes on until node 0, stopped for it, has ended too.
        let state = db
            .insert_events(&run, node(1), &[line(1, "b"), ended(2, 10, failed.clone())])
            .expect("insert")
            .ended;
        assert_eq!(state, None, "one node of two");
        assert_eq!(
            db.run(&run).expect("db").expect("run").state,
            RunState::Running
        );
        let stopped = RunEnd::Signaled {
            signal: 15,
            stop_requested: true,
        };
        let state = db
            .insert_events(&run, node(0), &[ended(1, 20, stopped)])
            .expect("insert")
            .ended;
        assert_eq!(state, Some(RunState::Failed));
        let row = db.run(&run).expect("db").expect("run");
        assert_eq!(row.exit, Some(failed));
        assert_eq!(row.ended_ms, Some(10), "when the cause ended");
        assert_eq!(
            row.error.as_deref(),
            Some("node 1: the process exited with 3")
        );
        // Both nodes' events are kept, each with its node.
        let nodes: Vec<u32> = db
            .node_events_after(&run, 0, 10, None)
            .expect("read")
            .iter()
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(nodes, [1, 1, 0]);
        assert_eq!(
            db.node_events_after(&run, 0, 10, Some(0))
                .expect("read")
                .len(),
            1
        );
    }

    #[test]
    fn each_source_keeps_its_own_numbering() {
        let (_dir, db) = db();
        let run = RunId::from_random([2; 6]);
        running(&db, &run);
        let first = Source::default();
        let node1 = Source {
            node: 1,
            incarnation: 0,
        };
        let again = Source {
            node: 0,
            incarnation: 1,
        };
        // Three sources numbering from 1: version 4 kept only the first of each number.
        db.insert_events(&run, first, &[line(1, "a1"), line(2, "a2")])
            .expect("a");
        db.insert_events(&run, node1, &[line(1, "b1"), line(2, "b2"), line(3, "b3")])
            .expect("b");
        db.insert_events(&run, again, &[line(1, "c1")]).expect("c");
        // Replays of what a source sent are still stored once.
        assert_eq!(
            db.insert_events(&run, node1, &[line(2, "b2"), line(3, "b3")])
                .expect("replay")
                .last_seq,
            3
        );
        let shown: Vec<(u64, String)> = db
            .events_after(&run, 0, 100)
            .expect("read")
            .into_iter()
            .map(|e| match e.kind {
                EventKind::Output { line, .. } => (e.seq, line),
                other => panic!("{other:?}"),
            })
            .collect();
        let want: Vec<(u64, String)> = ["a1", "a2", "b1", "b2", "b3", "c1"]
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u64 + 1, (*l).to_owned()))
            .collect();
        assert_eq!(shown, want, "numbered in the daemon's order of arrival");
        assert_eq!(db.last_seq(&run, first).expect("db"), 2);
        assert_eq!(db.last_seq(&run, node1).expect("db"), 3);
        assert_eq!(db.last_seq(&run, again).expect("db"), 1);
        assert_eq!(
            db.last_seq(
                &run,
                Source {
                    node: 2,
                    incarnation: 0
                }
            )
            .expect("db"),
            0
        );
        // --tail and a cursor work on the daemon's numbers.
        assert_eq!(db.start_after(&run, None, Some(2)).expect("db"), 4);
        assert_eq!(db.events_after(&run, 4, 100).expect("db").len(), 2);
    }

    #[test]
    fn a_version_4_database_keeps_its_events_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let run = RunId::from_random([3; 6]);
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(&format!(
                "{SCHEMA_V1} {MIGRATE_1_TO_2} {MIGRATE_2_TO_3} {MIGRATE_3_TO_4} PRAGMA user_version = 4;"
            ))
            .expect("a version 4 database");
            conn.execute(
                "INSERT INTO runs (id, instance, argv, workdir, state, created_ms) VALUES (?1, 'local-1', '[]', '/p', 'running', 1)",
                [run.as_str()],
            )
            .expect("run");
            for seq in [1u64, 2, 5] {
                conn.execute(
                    "INSERT INTO run_events (run_id, seq, at_ms, kind) VALUES (?1, ?2, ?2, ?3)",
                    params![
                        run.as_str(),
                        seq,
                        serde_json::to_string(&line(seq, &format!("old {seq}")).kind)
                            .expect("json")
                    ],
                )
                .expect("event");
            }
        }
        let db = Db::open(&path).expect("upgrade");
        let seqs: Vec<u64> = db
            .events_after(&run, 0, 100)
            .expect("read")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 5], "old events keep their numbers");
        assert_eq!(db.last_seq(&run, Source::default()).expect("db"), 5);
        // The agent's next events continue after them, and are shown after them.
        db.insert_events(&run, Source::default(), &[line(5, "old 5"), line(6, "new")])
            .expect("insert");
        let events = db.events_after(&run, 5, 100).expect("read");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].seq, 6);
        drop(db);
        Db::open(&path).expect("a current database opens as is");
    }

    #[test]
    fn a_budget_is_kept_and_its_stop_ends_the_run_so() {
        let (_dir, db) = db();
        let run = RunId::from_random([4; 6]);
        running(&db, &run);
        assert_eq!(db.run_budget(&run).expect("read"), None);
        let budget = RunBudget {
            max_cost: Some(2.5),
            max_ms: None,
            since_ms: 7,
        };
        db.set_run_budget(&run, &budget).expect("set");
        assert_eq!(db.run_budget(&run).expect("read"), Some(budget));
        let notice = RunEvent {
            seq: 1,
            at_ms: 5,
            kind: EventKind::Notice(protocol::Notice::BudgetExceeded {
                limit: protocol::budget::Limit::Cost {
                    max_micros: 2_500_000,
                },
                spend: protocol::budget::Spend {
                    cost_micros: Some(2_500_001),
                    elapsed_ms: 9,
                },
            }),
        };
        // The notice in one batch, the end in the next: the notice is remembered between.
        db.insert_events(&run, Source::default(), &[notice])
            .expect("insert");
        let ended = RunEvent {
            seq: 2,
            at_ms: 6,
            kind: EventKind::Ended(RunEnd::Exited {
                code: 0,
                stop_requested: true,
            }),
        };
        let state = db
            .insert_events(&run, Source::default(), &[ended])
            .expect("insert")
            .ended;
        assert_eq!(state, Some(RunState::BudgetExceeded));
        assert!(
            !db.set_run_state(&run, RunState::Failed, 9, None)
                .expect("set"),
            "budget_exceeded is terminal"
        );
    }
}
