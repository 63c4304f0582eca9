//! The peer store: everything the node learns about peers (records, addresses, topics, connection quality),
//! the topics it joined and its own persistent state, kept in one SQLite database.
//!
//! How it is built, and why:
//! - **One writer.** A dedicated OS thread (`store-writer`) owns the only write connection. Writes are queued
//!   to it over a bounded channel; it drains whatever is queued and applies it in ONE transaction, and after
//!   the commit broadcasts the resulting [`PeerEvent`]s, then answers each caller. SQLite allows one writer at a
//!   time anyway: funnelling writes through one thread turns lock contention ("database is locked") into a
//!   queue, and batching turns a burst of small writes into one commit. See `writer.rs`.
//! - **A read pool.** Reads go through an r2d2 pool of read connections inside `spawn_blocking`, never through
//!   the writer, so they are not queued behind writes.
//! - **WAL.** The journal mode is write-ahead logging, set once at open: readers see the last committed state
//!   and are not blocked by the writer (nor block it). `synchronous=NORMAL` makes a commit durable against a
//!   process crash without an fsync per commit. Checkpoints (copying the WAL back into the database file) run
//!   on a thread of their own (`store-checkpoint`), not inside the writer's commits; see `checkpoint.rs`.
//! - **Migrations** are an ordered list keyed on `PRAGMA user_version` (see `schema.rs`); a database from a
//!   newer build is refused rather than misread.
//! - **Retention.** Peers not seen for `retention`, and the least recently seen beyond `max_peers`, are pruned
//!   by the writer at start and every `prune_interval`; each peer keeps at most 32 addresses.

mod apply;
mod checkpoint;
mod codec;
mod read;
mod schema;
mod types;
mod writer;

#[cfg(test)]
mod tests;

pub use types::*;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::api::names::{NameError, NodeId};
use crate::telemetry::metrics::HistogramSnapshot;

use writer::{Command, Reply, StoreLimits, Writer, WriterConfig, WriterStatus};

/// Writes waiting for the writer beyond this make callers wait (backpressure) instead of growing memory.
const WRITE_QUEUE_CAPACITY: usize = 4096;
/// Events a slow subscriber may fall behind by before it sees `RecvError::Lagged`.
const EVENT_CAPACITY: usize = 1024;
/// How long a read waits for a free pooled connection.
const READ_POOL_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the database file with mode 0600 if it does not exist, and narrows the modes of an existing one and
/// of its WAL and shared-memory files to 0600. SQLite creates the WAL and `-shm` files with the database file's
/// mode, so the whole store stays private whatever the umask, also when the data dir already existed with
/// wider modes. Peer records are not secrets, but which peers a node talks to is nobody else's business.
fn make_files_private(database: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Permissions { path, source }
    };
    if std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(database).is_err() {
        // A missing directory, a read-only file system, a file we may not write: opening the database fails
        // the same way next, and reports it with its advice.
        return Ok(());
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = database.as_os_str().to_owned();
        name.push(suffix);
        let path = PathBuf::from(name);
        let mode = match std::fs::metadata(&path) {
            Ok(meta) => meta.permissions().mode(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(error(&path)(e)),
        };
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(error(&path))?;
            tracing::info!(path = %path.display(), "peer store file was readable by others; narrowed to 0600");
        }
    }
    Ok(())
}

/// Why a store operation failed. Each message says what went wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the peer store database {}: {source}; {}",
        .path.display(),
        open_advice(.source)
    )]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error(
        "database {} has schema version {found}, newer than this build supports ({supported}); run a newer \
         remote-network or move the database away",
        .path.display()
    )]
    NewerSchema { path: PathBuf, found: u32, supported: u32 },
    #[error(
        "peer store database error: {0}; if it keeps happening, check the database file with \
         `sqlite3 FILE 'PRAGMA integrity_check'`"
    )]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "no read connection to the peer store became available: {0}; the node may be overloaded, or the \
         database file unreadable"
    )]
    Pool(#[from] r2d2::Error),
    #[error(
        "cannot join more than {max} topics; leave a topic first or raise store.max_joined_topics in the \
         configuration"
    )]
    TooManyTopics { max: u64 },
    #[error("invalid topic: {0}")]
    InvalidTopic(#[from] NameError),
    #[error(
        "the page cursor belongs to a different sort order than the query; list again from the first page"
    )]
    CursorOrderMismatch,
    #[error("the store is shutting down; the write was not made")]
    Closed,
    #[error("writing to the peer store failed: {0}")]
    WriteFailed(String),
    #[error(
        "cannot make the peer store file {} private (mode 0600): {source}; check the data dir's ownership",
        .path.display()
    )]
    Permissions { path: PathBuf, source: std::io::Error },
    #[error("cannot start the peer store writer thread: {0}; the system may be out of threads or memory")]
    WriterThread(#[source] std::io::Error),
    #[error("cannot start the peer store checkpoint thread: {0}; the system may be out of threads or memory")]
    CheckpointThread(#[source] std::io::Error),
    #[error("a peer store read task failed: {0}; this is a bug, please report it with the log")]
    Join(#[from] tokio::task::JoinError),
}

/// What to do about a failure to open the database, by SQLite's error code.
fn open_advice(error: &rusqlite::Error) -> &'static str {
    use rusqlite::ErrorCode::*;
    match error.sqlite_error_code() {
        Some(ReadOnly) => {
            "the file or its directory is read-only: make both writable by the daemon's user (WAL mode \
             creates -wal and -shm files beside the database)"
        }
        Some(CannotOpen | PermissionDenied) => {
            "check that the directory exists and that the daemon's user may create and write files in it"
        }
        Some(NotADatabase) => {
            "the file is not an SQLite database: point the store path elsewhere or move the file away"
        }
        Some(DatabaseCorrupt) => {
            "the database is damaged: restore a backup or move it away to start with an empty store"
        }
        Some(DatabaseBusy | DatabaseLocked) => {
            "another process holds the database locked: make sure no other node uses the same store path"
        }
        Some(DiskFull) => "the disk is full: free space and start again",
        _ => "check the store path and the permissions of the file and its directory",
    }
}

/// A cheap, cloneable handle to the store. The writer stops when [`Store::close`] is called or every handle
/// is dropped, after committing what was already queued.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    /// Taken by `close()`: once gone, writes fail with [`StoreError::Closed`] and the writer drains and stops.
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    writer_stopped: watch::Receiver<bool>,
    pool: r2d2::Pool<SqliteConnectionManager>,
    events: broadcast::Sender<PeerEvent>,
    status: Arc<WriterStatus>,
    /// The bounds the writer enforces, changed by [`Store::set_limits`].
    limits: Arc<StoreLimits>,
}

fn retention_ms(retention: Duration) -> i64 {
    i64::try_from(retention.as_millis()).unwrap_or(i64::MAX)
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.shared.path)
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the DB, runs migrations, starts the writer. Must be called inside a tokio
    /// runtime (for the periodic prune timer; without one the store only prunes at start and on request).
    pub fn open(options: StoreOptions) -> Result<Store, StoreError> {
        make_files_private(&options.path)?;
        let conn = schema::open_write_connection(&options.path)?;

        let manager = SqliteConnectionManager::file(&options.path)
            .with_flags(schema::read_flags())
            .with_init(schema::init_read_connection);
        let pool = r2d2::Pool::builder()
            .max_size(options.read_pool_size.max(1))
            .connection_timeout(READ_POOL_TIMEOUT)
            .build(manager)?;

        let (command_sender, command_receiver) = mpsc::channel(WRITE_QUEUE_CAPACITY);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (stopped_sender, writer_stopped) = watch::channel(false);
        let status = Arc::new(WriterStatus::new());
        let checkpointer = checkpoint::Checkpointer::start(&options.path, Arc::clone(&status))?;
        let limits = Arc::new(StoreLimits {
            retention_ms: AtomicI64::new(retention_ms(options.retention)),
            max_peers: AtomicU64::new(options.max_peers),
            max_joined_topics: AtomicU64::new(options.max_joined_topics),
        });
        let writer = Writer {
            conn,
            checkpointer,
            commands: command_receiver,
            config: WriterConfig { limits: Arc::clone(&limits), max_batch: options.max_batch },
            events: events.clone(),
            status: Arc::clone(&status),
            stopped: stopped_sender,
        };
        let writer_thread = std::thread::Builder::new()
            .name("store-writer".to_owned())
            .spawn(move || writer.run())
            .map_err(StoreError::WriterThread)?;

        start_prune_timer(&command_sender, options.prune_interval);

        tracing::info!(path = %options.path.display(), "peer store open");
        Ok(Store {
            shared: Arc::new(Shared {
                path: options.path,
                commands: Mutex::new(Some(command_sender)),
                writer_thread: Mutex::new(Some(writer_thread)),
                writer_stopped,
                pool,
                events,
                status,
                limits,
            }),
        })
    }

    /// Changes the retention and the caps (a configuration reload), then prunes at once, so that a lower cap
    /// or a shorter retention holds from now on rather than from the next periodic prune. Returns the peers
    /// pruned.
    pub async fn set_limits(
        &self,
        retention: Duration,
        max_peers: u64,
        max_joined_topics: u64,
    ) -> Result<u64, StoreError> {
        let limits = &self.shared.limits;
        limits.retention_ms.store(retention_ms(retention), Ordering::Relaxed);
        limits.max_peers.store(max_peers, Ordering::Relaxed);
        limits.max_joined_topics.store(max_joined_topics, Ordering::Relaxed);
        self.prune(writer::now_ms()).await
    }

    /// Commits everything already submitted, stops the writer and waits for it. Later writes fail with
    /// [`StoreError::Closed`]; reads keep working until the last handle is dropped.
    pub async fn close(&self) -> Result<(), StoreError> {
        // Dropping the last sender lets the writer drain the queue and stop. (Poisoning: see `sender`.)
        drop(self.shared.commands.lock().unwrap_or_else(PoisonError::into_inner).take());
        let thread = self.shared.writer_thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(thread) = thread {
            let joined = tokio::task::spawn_blocking(move || thread.join()).await?;
            if joined.is_err() {
                return Err(StoreError::WriteFailed(
                    "the store writer thread panicked; writes since the last commit may be lost, see the log"
                        .to_owned(),
                ));
            }
        } else {
            // Another close() is joining the thread: wait for the writer's stop signal instead. An error means
            // the signal's sender is gone, which also means the writer stopped.
            let mut stopped = self.shared.writer_stopped.clone();
            let _ = stopped.wait_for(|stopped| *stopped).await;
        }
        Ok(())
    }

    /// Inserts or merges a peer; see [`PeerUpsert`] for how seq decides.
    pub async fn upsert_peer(&self, upsert: PeerUpsert) -> Result<UpsertOutcome, StoreError> {
        self.write(|reply| Command::Upsert { upsert: Box::new(upsert), reply }).await
    }

    /// [`Store::upsert_peer`] then, unless the upsert was [`UpsertOutcome::Stale`], [`Store::record_quality`]
    /// with `quality`, as one write: one trip to the writer and one command of its batch, with the events of the
    /// two. For a record that just arrived over a connection, with that connection's outcome.
    pub async fn upsert_verified(
        &self,
        upsert: PeerUpsert,
        quality: Option<QualitySample>,
    ) -> Result<UpsertOutcome, StoreError> {
        self.write(|reply| Command::UpsertVerified { upsert: Box::new(upsert), quality, reply }).await
    }

    /// Folds a connection attempt into the peer's quality and score. A sample for an unknown peer is dropped.
    pub async fn record_quality(&self, node_id: NodeId, sample: QualitySample) -> Result<(), StoreError> {
        self.write(|reply| Command::RecordQuality { node_id, sample, reply }).await
    }

    /// Deletes a peer and everything about it; returns whether it was stored.
    pub async fn forget_peer(&self, node_id: NodeId) -> Result<bool, StoreError> {
        self.write(|reply| Command::Forget { node_id, reply }).await
    }

    /// Returns the topic row and whether it was newly joined. Fails with TooManyTopics beyond
    /// options.max_joined_topics.
    pub async fn join_topic(&self, topic: String, now_ms: i64) -> Result<(JoinedTopic, bool), StoreError> {
        self.write(|reply| Command::JoinTopic { topic, now_ms, reply }).await
    }

    /// Returns whether the topic was joined.
    pub async fn leave_topic(&self, topic: String) -> Result<bool, StoreError> {
        self.write(|reply| Command::LeaveTopic { topic, reply }).await
    }

    /// Reserves the next seq for the node's own metadata record, persisted before it is returned: strictly
    /// above every seq reserved before, across restarts, and at least `floor`.
    pub async fn next_record_seq(&self, floor: u64) -> Result<u64, StoreError> {
        self.write(|reply| Command::NextRecordSeq { floor, reply }).await
    }

    /// Counts one hole-punch attempt (either role) for its pair of NAT types.
    pub async fn record_punch(&self, outcome: PunchOutcome) -> Result<(), StoreError> {
        self.write(|reply| Command::RecordPunch { outcome, reply }).await
    }

    /// Punch attempts and outcomes per pair of NAT types, ordered by the pair.
    pub async fn punch_stats(&self) -> Result<Vec<PunchStats>, StoreError> {
        self.read(|conn| read::punch_stats(conn)).await
    }

    /// Deletes peers with last_seen < now_ms - retention, then the least recently seen beyond max_peers.
    /// Returns how many were removed.
    pub async fn prune(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.write(|reply| Command::Prune { now_ms, reply: Some(reply) }).await
    }

    /// One page of peers; see [`PeerQuery`].
    pub async fn list_peers(&self, query: PeerQuery) -> Result<PeerPage, StoreError> {
        self.read(move |conn| read::list_peers(conn, &query)).await
    }

    pub async fn get_peer(&self, node_id: NodeId) -> Result<Option<PeerDetail>, StoreError> {
        self.read(move |conn| read::get_peer(conn, &node_id)).await
    }

    /// Joined topics sorted by name, with the number of stored peers sharing each.
    pub async fn joined_topics(&self) -> Result<Vec<JoinedTopic>, StoreError> {
        self.read(|conn| read::joined_topics(conn)).await
    }

    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        let path = self.shared.path.clone();
        let mut stats = self.read(move |conn| read::stats(conn, &path)).await?;
        stats.writes_committed = self.shared.status.writes_committed.load(Ordering::Relaxed);
        stats.write_batches = self.shared.status.write_batches.load(Ordering::Relaxed);
        Ok(stats)
    }

    /// Changes to peers, each sent after the transaction holding it committed and before the write that caused
    /// it returns: a subscriber sees the events of every write submitted after it subscribed, and none of those
    /// of writes that returned before.
    pub fn subscribe(&self) -> broadcast::Receiver<PeerEvent> {
        self.shared.events.subscribe()
    }

    /// Commands per committed write batch, since the store opened (exported as a metrics histogram).
    pub fn write_batch_sizes(&self) -> HistogramSnapshot {
        self.shared.status.batch_size.snapshot()
    }

    /// Seconds from BEGIN to the end of COMMIT per committed write batch, since the store opened (exported as
    /// a metrics histogram): a write waits at least its batch's time, plus the time it spent queued.
    pub fn write_batch_seconds(&self) -> HistogramSnapshot {
        self.shared.status.batch_seconds.snapshot()
    }

    pub fn health(&self) -> StoreHealth {
        self.shared.status.health()
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Queues a write and waits until the transaction holding it committed (or failed).
    async fn write<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let sender = self.sender()?;
        let (reply, answer) = oneshot::channel();
        sender.send(command(reply)).await.map_err(|_| StoreError::Closed)?;
        drop(sender);
        // The writer drops a reply unanswered only if it died mid-batch.
        answer.await.map_err(|_| StoreError::Closed)?
    }

    fn sender(&self) -> Result<mpsc::Sender<Command>, StoreError> {
        // A poisoned lock only means a thread panicked while holding it; the Option inside is always whole.
        self.shared.commands.lock().unwrap_or_else(PoisonError::into_inner).clone().ok_or(StoreError::Closed)
    }

    /// Runs a query on a pooled read connection on tokio's blocking threads.
    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&mut rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let pool = self.shared.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.get()?;
            query(&mut conn)
        })
        .await?
    }
}

/// Asks the writer to prune every `interval`. The timer holds only a weak sender, so it never keeps the
/// writer alive: once the store is closed (or dropped) the next tick ends it.
fn start_prune_timer(commands: &mpsc::Sender<Command>, interval: Duration) {
    if interval.is_zero() {
        tracing::info!("periodic pruning of the peer store is off (prune interval 0)");
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("peer store opened outside a tokio runtime: it prunes only at start and on request");
        return;
    };
    // Capped so that adding it to the clock cannot overflow (a year is "practically never" anyway).
    let interval = interval.min(Duration::from_secs(365 * 24 * 3600));
    let commands = commands.downgrade();
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(sender) = commands.upgrade() else {
                return;
            };
            let command = Command::Prune { now_ms: writer::now_ms(), reply: None };
            if sender.send(command).await.is_err() {
                return;
            }
        }
    });
}
