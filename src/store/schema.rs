//! The database schema as an ordered list of migrations, and opening the database file: the write connection
//! (which sets WAL mode and migrates) and the settings of the read connections.
//!
//! Migration `i` (0-based) brings the schema to version `i + 1`, the number kept in `PRAGMA user_version`.
//! Migrations are append-only: a released one is never edited, a change is a new entry.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::StoreError;

/// How long a connection waits for a lock before giving up with "database is locked". Readers rarely wait in
/// WAL mode (only around checkpoints); the writer is the only writer, so this mostly covers other processes
/// such as an operator's `sqlite3` shell.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Prepared statements kept per connection: room for all of the writer's statements and for the list query's
/// variants (order × filters × cursor), so none is re-prepared on every call (rusqlite's default keeps 16).
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// Page cache of the write connection, in KiB (SQLite's default is 2 MiB). A batch of upserts dirties pages
/// all over the peers table and its indexes; with the default cache a big batch spilled dirty pages into the WAL
/// before its COMMIT and re-read hot index pages between batches. Pages are only allocated as they are used.
const WRITER_CACHE_KIB: i64 = 32 * 1024;

/// WAL pages at which the writer checkpoints inside its COMMIT. Checkpoints normally run on the checkpoint
/// thread (see `checkpoint.rs`); this backstop, above SQLite's default of 1000, only fires if that thread falls
/// behind, and keeps the WAL bounded (about 32 MiB with 4 KiB pages) whatever happens.
pub(crate) const WAL_BACKSTOP_PAGES: i64 = 8192;

/// The schema versions, in order. See the module doc for the rules.
const MIGRATIONS: &[&str] = &[
    // v1: peers and what is known about them, joined topics, the node's own state.
    r#"
    CREATE TABLE peers (
        node_id    BLOB    PRIMARY KEY NOT NULL CHECK (length(node_id) = 32),
        seq        INTEGER NOT NULL,
        record     BLOB    NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen  INTEGER NOT NULL,
        node_type  INTEGER NOT NULL DEFAULT 0,
        nat_type   INTEGER NOT NULL DEFAULT 0,
        score      REAL    NOT NULL DEFAULT 0
    );
    CREATE INDEX peers_by_last_seen ON peers (last_seen DESC, node_id);
    CREATE INDEX peers_by_score ON peers (score DESC, node_id);

    CREATE TABLE peer_addresses (
        node_id              BLOB    NOT NULL REFERENCES peers (node_id) ON DELETE CASCADE,
        address              TEXT    NOT NULL,
        source               INTEGER NOT NULL DEFAULT 0,
        first_seen           INTEGER NOT NULL,
        last_success         INTEGER,
        last_failure         INTEGER,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (node_id, address)
    ) WITHOUT ROWID;

    CREATE TABLE peer_topics (
        node_id BLOB NOT NULL REFERENCES peers (node_id) ON DELETE CASCADE,
        topic   TEXT NOT NULL,
        PRIMARY KEY (node_id, topic)
    ) WITHOUT ROWID;
    CREATE INDEX peer_topics_by_topic ON peer_topics (topic, node_id);

    CREATE TABLE peer_quality (
        node_id         BLOB    PRIMARY KEY NOT NULL REFERENCES peers (node_id) ON DELETE CASCADE,
        rtt_ewma_us     INTEGER,
        rtt_samples     INTEGER NOT NULL DEFAULT 0,
        successes       INTEGER NOT NULL DEFAULT 0,
        failures        INTEGER NOT NULL DEFAULT 0,
        last_error      TEXT,
        last_error_at   INTEGER,
        last_success_at INTEGER
    ) WITHOUT ROWID;

    CREATE TABLE peer_capabilities (
        node_id          BLOB    PRIMARY KEY NOT NULL REFERENCES peers (node_id) ON DELETE CASCADE,
        os               TEXT    NOT NULL,
        arch             TEXT    NOT NULL,
        cpu_cores        INTEGER NOT NULL,
        memory_bytes     INTEGER NOT NULL,
        software_version TEXT    NOT NULL
    ) WITHOUT ROWID;

    -- One row per service in the order the record lists them; attributes use the escaped key=value lines of
    -- codec::encode_attributes.
    CREATE TABLE peer_services (
        node_id    BLOB    NOT NULL REFERENCES peers (node_id) ON DELETE CASCADE,
        position   INTEGER NOT NULL,
        name       TEXT    NOT NULL,
        version    TEXT    NOT NULL,
        attributes TEXT    NOT NULL,
        PRIMARY KEY (node_id, position)
    ) WITHOUT ROWID;

    CREATE TABLE joined_topics (
        topic     TEXT    PRIMARY KEY NOT NULL,
        joined_at INTEGER NOT NULL
    );

    -- The node's own persistent state (e.g. the seq of its own record), by key.
    CREATE TABLE node_state (
        key   TEXT PRIMARY KEY NOT NULL,
        value BLOB NOT NULL
    );
    "#,
    // v2: hole-punch outcomes by (our NAT type, their NAT type), kept across restarts for `rnctl nat status`.
    r#"
    CREATE TABLE punch_stats (
        our_nat         INTEGER NOT NULL,
        their_nat       INTEGER NOT NULL,
        attempts        INTEGER NOT NULL,
        successes       INTEGER NOT NULL,
        last_outcome    TEXT    NOT NULL,
        last_at         INTEGER NOT NULL,
        last_success_ms INTEGER,
        PRIMARY KEY (our_nat, their_nat)
    ) WITHOUT ROWID;
    "#,
    // v3: peers get an integer id, assigned in insertion order, and what hangs off a peer is keyed by it
    // instead of by the random 32-byte node id. With random keys a batch of new peers touched nearly every
    // leaf page of every table and index, and each commit rewrote most of the database into the WAL; keyed by
    // the id, a batch's rows land together at the end of each B-tree. The node id keeps its own unique index
    // for lookups. Peers with equal scores are now listed in insertion order (by id) rather than by node id:
    // every new peer scores 0, so (score, node_id) put each one at a random place in the score index.
    // Last-seen order still breaks ties by node id; its index stays local because last_seen tracks time.
    //
    // The old tables are copied into new ones, dropped, and the new ones renamed (which rewrites the foreign
    // keys that name them). Existing peers are numbered by first_seen, the closest to insertion order known.
    r#"
    CREATE TABLE peers_v3 (
        id         INTEGER PRIMARY KEY,
        node_id    BLOB    NOT NULL UNIQUE CHECK (length(node_id) = 32),
        seq        INTEGER NOT NULL,
        record     BLOB    NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen  INTEGER NOT NULL,
        node_type  INTEGER NOT NULL DEFAULT 0,
        nat_type   INTEGER NOT NULL DEFAULT 0,
        score      REAL    NOT NULL DEFAULT 0
    );
    INSERT INTO peers_v3 (node_id, seq, record, first_seen, last_seen, node_type, nat_type, score)
        SELECT node_id, seq, record, first_seen, last_seen, node_type, nat_type, score
        FROM peers ORDER BY first_seen, node_id;

    CREATE TABLE peer_addresses_v3 (
        peer                 INTEGER NOT NULL REFERENCES peers_v3 (id) ON DELETE CASCADE,
        address              TEXT    NOT NULL,
        source               INTEGER NOT NULL DEFAULT 0,
        first_seen           INTEGER NOT NULL,
        last_success         INTEGER,
        last_failure         INTEGER,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (peer, address)
    ) WITHOUT ROWID;
    INSERT INTO peer_addresses_v3
        (peer, address, source, first_seen, last_success, last_failure, consecutive_failures)
        SELECT p.id, a.address, a.source, a.first_seen, a.last_success, a.last_failure, a.consecutive_failures
        FROM peer_addresses a JOIN peers_v3 p ON p.node_id = a.node_id;

    CREATE TABLE peer_topics_v3 (
        peer  INTEGER NOT NULL REFERENCES peers_v3 (id) ON DELETE CASCADE,
        topic TEXT    NOT NULL,
        PRIMARY KEY (peer, topic)
    ) WITHOUT ROWID;
    INSERT INTO peer_topics_v3 (peer, topic)
        SELECT p.id, t.topic FROM peer_topics t JOIN peers_v3 p ON p.node_id = t.node_id;

    CREATE TABLE peer_quality_v3 (
        peer            INTEGER PRIMARY KEY REFERENCES peers_v3 (id) ON DELETE CASCADE,
        rtt_ewma_us     INTEGER,
        rtt_samples     INTEGER NOT NULL DEFAULT 0,
        successes       INTEGER NOT NULL DEFAULT 0,
        failures        INTEGER NOT NULL DEFAULT 0,
        last_error      TEXT,
        last_error_at   INTEGER,
        last_success_at INTEGER
    );
    INSERT INTO peer_quality_v3
        (peer, rtt_ewma_us, rtt_samples, successes, failures, last_error, last_error_at, last_success_at)
        SELECT p.id, q.rtt_ewma_us, q.rtt_samples, q.successes, q.failures, q.last_error, q.last_error_at,
               q.last_success_at
        FROM peer_quality q JOIN peers_v3 p ON p.node_id = q.node_id;

    CREATE TABLE peer_capabilities_v3 (
        peer             INTEGER PRIMARY KEY REFERENCES peers_v3 (id) ON DELETE CASCADE,
        os               TEXT    NOT NULL,
        arch             TEXT    NOT NULL,
        cpu_cores        INTEGER NOT NULL,
        memory_bytes     INTEGER NOT NULL,
        software_version TEXT    NOT NULL
    );
    INSERT INTO peer_capabilities_v3 (peer, os, arch, cpu_cores, memory_bytes, software_version)
        SELECT p.id, c.os, c.arch, c.cpu_cores, c.memory_bytes, c.software_version
        FROM peer_capabilities c JOIN peers_v3 p ON p.node_id = c.node_id;

    -- As in v1: one row per service in the record's order, attributes as codec::encode_attributes lines.
    CREATE TABLE peer_services_v3 (
        peer       INTEGER NOT NULL REFERENCES peers_v3 (id) ON DELETE CASCADE,
        position   INTEGER NOT NULL,
        name       TEXT    NOT NULL,
        version    TEXT    NOT NULL,
        attributes TEXT    NOT NULL,
        PRIMARY KEY (peer, position)
    ) WITHOUT ROWID;
    INSERT INTO peer_services_v3 (peer, position, name, version, attributes)
        SELECT p.id, s.position, s.name, s.version, s.attributes
        FROM peer_services s JOIN peers_v3 p ON p.node_id = s.node_id;

    -- Children first: nothing references the old peers table when it goes, so dropping it cascades nowhere.
    DROP TABLE peer_addresses;
    DROP TABLE peer_topics;
    DROP TABLE peer_quality;
    DROP TABLE peer_capabilities;
    DROP TABLE peer_services;
    DROP TABLE peers;
    ALTER TABLE peers_v3 RENAME TO peers;
    ALTER TABLE peer_addresses_v3 RENAME TO peer_addresses;
    ALTER TABLE peer_topics_v3 RENAME TO peer_topics;
    ALTER TABLE peer_quality_v3 RENAME TO peer_quality;
    ALTER TABLE peer_capabilities_v3 RENAME TO peer_capabilities;
    ALTER TABLE peer_services_v3 RENAME TO peer_services;

    CREATE INDEX peers_by_last_seen ON peers (last_seen DESC, node_id);
    CREATE INDEX peers_by_score ON peers (score DESC, id);
    CREATE INDEX peer_topics_by_topic ON peer_topics (topic, peer);
    "#,
];

/// The schema version this build creates and understands.
pub(crate) const LATEST_VERSION: u32 = MIGRATIONS.len() as u32;

/// Opens (creating if needed) the database for writing, enables WAL, checks that the file is writable and
/// migrates it to [`LATEST_VERSION`].
pub(crate) fn open_write_connection(path: &Path) -> Result<Connection, StoreError> {
    let open_error = |source| StoreError::Open { path: path.to_path_buf(), source };
    // No SQLITE_OPEN_URI: the configured path is a file name, never a `file:` URI with options.
    let flags =
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(open_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);

    // Refuse a newer schema before changing anything in the file (WAL mode rewrites its header). Reading the
    // version is also the first access to the file, which is where "file is not a database" shows up.
    let found = read_user_version(&conn).map_err(open_error)?;
    if found > LATEST_VERSION {
        return Err(StoreError::NewerSchema { path: path.to_path_buf(), found, supported: LATEST_VERSION });
    }

    // SQLite silently opens a write-protected file read-only; say so now rather than at the first write.
    if conn.is_readonly("main").map_err(open_error)? {
        return Err(open_error(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY),
            Some("the database file is read-only".to_owned()),
        )));
    }

    // Set once here, on this single connection: WAL mode is persistent in the file, and switching it from
    // several pool connections at once fails with "database is locked".
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)).map_err(open_error)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(open_error(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!(
                "could not enable WAL mode (journal mode stayed {mode:?}); the file system may not support it"
            )),
        )));
    }
    // NORMAL is durable against process crashes in WAL mode; only a power loss can drop the last commits.
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_error)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(open_error)?;
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB).map_err(open_error)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_BACKSTOP_PAGES).map_err(open_error)?;

    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Opens the checkpoint thread's connection to a database the write connection already set up. It reads and
/// writes no rows: checkpointing only copies pages from the WAL into the database file.
pub(crate) fn open_checkpoint_connection(path: &Path) -> Result<Connection, StoreError> {
    let open_error = |source| StoreError::Open { path: path.to_path_buf(), source };
    let conn = Connection::open_with_flags(path, read_flags()).map_err(open_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
    // Closing a connection may checkpoint too; that is this connection's job only when asked.
    conn.pragma_update(None, "wal_autocheckpoint", 0).map_err(open_error)?;
    Ok(conn)
}

/// Runs the missing migrations in one IMMEDIATE transaction. Taking the write lock up front also proves the
/// database is writable even when there is nothing to migrate.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let open_error = |source| StoreError::Open { path: path.to_path_buf(), source };
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(open_error)?;
    // Read again under the lock: another process may have migrated in between.
    let found = read_user_version(&tx).map_err(open_error)?;
    if found > LATEST_VERSION {
        return Err(StoreError::NewerSchema { path: path.to_path_buf(), found, supported: LATEST_VERSION });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql).map_err(open_error)?;
        tracing::info!(path = %path.display(), version = index + 1, "migrated the peer store schema");
    }
    // Written even when unchanged: a write under the lock is what proves the file accepts writes.
    tx.pragma_update(None, "user_version", LATEST_VERSION).map_err(open_error)?;
    tx.commit().map_err(open_error)
}

/// Creates on an empty database the schema an older build left at `version`, for tests of the upgrade from it.
#[cfg(test)]
pub(crate) fn create_old_version(conn: &Connection, version: u32) -> rusqlite::Result<()> {
    for sql in &MIGRATIONS[..version as usize] {
        conn.execute_batch(sql)?;
    }
    conn.pragma_update(None, "user_version", version)
}

/// `PRAGMA user_version`. SQLite keeps it as a signed 32-bit number; a negative value (never written by this
/// code) reads as a huge version, so it is refused as newer rather than migrated over.
pub(crate) fn read_user_version(conn: &Connection) -> rusqlite::Result<u32> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    Ok(u32::try_from(version).unwrap_or(u32::MAX))
}

/// Flags of the pooled read connections: the file must already exist (the write connection created it).
pub(crate) fn read_flags() -> OpenFlags {
    OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
}

/// Per-connection settings of a pooled read connection. `query_only` makes any accidental write through the
/// pool fail instead of competing with the writer for the lock. Journal mode is deliberately not set here.
pub(crate) fn init_read_connection(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "query_only", "ON")
}
