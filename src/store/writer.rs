//! The single writer: one OS thread that owns the only write connection and applies every change.
//!
//! It waits for a command, drains whatever else is already queued (up to `max_batch`) and applies the lot in
//! one IMMEDIATE transaction, so a burst of small writes costs one commit (one WAL fsync at most) instead of
//! one each. A command that fails for its own reasons (e.g. too many topics) is rolled back alone and the rest
//! of the batch still commits: the batch first runs without savepoints (they are costly in SQLite), and only
//! if a command fails is it rolled back and replayed with a SAVEPOINT per command. Callers are answered only
//! after COMMIT returned, right after the batch's [`PeerEvent`]s were broadcast, so whoever reacts to an event
//! or an answer can already read the change through the pool, and a write that returned has had its events
//! sent.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::api::names::NodeId;

use super::StoreError;
use super::apply::{
    apply_forget, apply_join_topic, apply_leave_topic, apply_next_record_seq, apply_prune, apply_quality,
    apply_record_punch, apply_upsert, apply_upsert_verified,
};
use super::checkpoint::Checkpointer;
use super::types::{
    JoinedTopic, PeerEvent, PeerUpsert, PunchOutcome, QualitySample, StoreHealth, UpsertOutcome,
};
use crate::telemetry::metrics::{Histogram, exponential_buckets};

/// Most addresses kept per peer. Addresses are only ever merged in, and peers (or whoever relays them) choose
/// what they announce, so without a bound one lying peer could grow `peer_addresses` forever.
pub(crate) const MAX_ADDRESSES_PER_PEER: i64 = 32;

/// Where a command's result goes. `None` for the writer's own periodic prune, which nobody awaits.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One write, as queued by a [`super::Store`] handle.
pub(crate) enum Command {
    Upsert {
        upsert: Box<PeerUpsert>,
        reply: Reply<UpsertOutcome>,
    },
    /// An upsert and, unless it turns out stale, the quality of the connection that brought it: one command,
    /// so one round trip to the writer and one entry of its batch instead of two.
    UpsertVerified {
        upsert: Box<PeerUpsert>,
        quality: Option<QualitySample>,
        reply: Reply<UpsertOutcome>,
    },
    RecordQuality {
        node_id: NodeId,
        sample: QualitySample,
        reply: Reply<()>,
    },
    Forget {
        node_id: NodeId,
        reply: Reply<bool>,
    },
    JoinTopic {
        topic: String,
        now_ms: i64,
        reply: Reply<(JoinedTopic, bool)>,
    },
    LeaveTopic {
        topic: String,
        reply: Reply<bool>,
    },
    Prune {
        now_ms: i64,
        reply: Option<Reply<u64>>,
    },
    NextRecordSeq {
        floor: u64,
        reply: Reply<u64>,
    },
    RecordPunch {
        outcome: PunchOutcome,
        reply: Reply<()>,
    },
    /// Runs raw SQL inside the batch, so tests can provoke failures (e.g. a full database).
    #[cfg(test)]
    Execute {
        sql: String,
        reply: Reply<()>,
    },
}

/// A peer's integer id: the rowid of its `peers` row, which every table about the peer is keyed by (see the
/// v3 migration in `schema.rs`). Found once per command from the node id, then used for every statement.
#[derive(Debug, Clone, Copy)]
pub(super) struct PeerId(pub(super) i64);

/// The bounds the writer enforces, taken from [`super::StoreOptions`].
pub(crate) struct WriterConfig {
    /// Shared with the store's handles, which change them when the configuration is reloaded.
    pub limits: Arc<StoreLimits>,
    pub max_batch: usize,
}

/// The store's bounds that a reload may change: read by the writer as each command is queued for a batch.
#[derive(Debug)]
pub(crate) struct StoreLimits {
    pub retention_ms: AtomicI64,
    pub max_peers: AtomicU64,
    pub max_joined_topics: AtomicU64,
}

/// What the writer reports to the handles: health, the counters shown in stats and the histograms exported
/// as metrics. Everything but health is atomics, so the writer pays a few uncontended atomic adds per batch.
#[derive(Debug)]
pub(crate) struct WriterStatus {
    health: Mutex<StoreHealth>,
    pub writes_committed: AtomicU64,
    pub write_batches: AtomicU64,
    /// Commands per committed batch.
    pub batch_size: Histogram,
    /// Seconds from BEGIN to the end of COMMIT of each committed batch: how long its callers waited at least.
    pub batch_seconds: Histogram,
}

impl WriterStatus {
    pub(crate) fn new() -> Self {
        Self {
            health: Mutex::new(StoreHealth::Ok),
            writes_committed: AtomicU64::new(0),
            write_batches: AtomicU64::new(0),
            // 1 to 4096: covers every `max_batch` up to the queue's capacity.
            batch_size: Histogram::new(&exponential_buckets(1.0, 2.0, 13)),
            // 50 µs to about 3.3 s: an in-cache batch takes well under a millisecond, a slow disk seconds.
            batch_seconds: Histogram::new(&exponential_buckets(0.000_05, 2.0, 17)),
        }
    }

    pub(crate) fn health(&self) -> StoreHealth {
        // A poisoned lock only means a thread panicked while holding it; the value itself is always whole.
        self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_health(&self, new: StoreHealth) {
        // Poisoning is harmless here too (see `health`).
        let mut health = self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *health == new {
            return;
        }
        match &new {
            StoreHealth::Ok => tracing::info!("peer store writes succeed again"),
            StoreHealth::Degraded(reason) => {
                tracing::error!(%reason, "peer store writes are failing")
            }
        }
        *health = new;
    }
}

/// Everything the writer thread owns.
pub(crate) struct Writer {
    pub conn: Connection,
    /// Checkpoints the WAL beside the writer; stopped before the write connection closes.
    pub checkpointer: Checkpointer,
    pub commands: mpsc::Receiver<Command>,
    pub config: WriterConfig,
    pub events: broadcast::Sender<PeerEvent>,
    pub status: std::sync::Arc<WriterStatus>,
    /// Set to `true` when the thread ends, however it ends (see [`StoppedSignal`]).
    pub stopped: watch::Sender<bool>,
}

/// Tells `close()` that the writer is gone when dropped, so a panicking writer still releases its waiters.
struct StoppedSignal(watch::Sender<bool>);

impl Drop for StoppedSignal {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl Writer {
    /// The thread's body: runs until every sender is gone and the queue is empty, then closes the connection.
    pub(crate) fn run(self) {
        let Writer { mut conn, checkpointer, mut commands, config, events, status, stopped } = self;
        let _stopped = StoppedSignal(stopped);
        let max_batch = config.max_batch.max(1);
        let mut context = BatchContext { events: &events, status: &status, checkpointer: &checkpointer };

        // Prune once at start: a node that was down for a long time should not serve stale peers until the
        // first periodic prune.
        let prune = Command::Prune { now_ms: now_ms(), reply: None };
        context.run_batch(&mut conn, vec![prune.into_job(&config)]);

        while let Some(first) = commands.blocking_recv() {
            let mut batch = Vec::with_capacity(64);
            batch.push(first.into_job(&config));
            while batch.len() < max_batch {
                match commands.try_recv() {
                    Ok(command) => batch.push(command.into_job(&config)),
                    Err(_) => break,
                }
            }
            context.run_batch(&mut conn, batch);
        }
        checkpointer.stop();

        // Closing explicitly checkpoints the WAL into the database file; a failure only leaves the WAL for the
        // next open to replay, so it is logged, not fatal.
        if let Err((_, error)) = conn.close() {
            tracing::warn!(%error, "closing the peer store's write connection failed");
        }
        tracing::debug!("peer store writer stopped");
    }
}

pub(crate) use crate::clock::now_ms;

/// A queued command taken apart for its batch: the change to make, which can be run again if the batch is
/// replayed, and the caller to answer once the COMMIT's outcome is known.
trait Job {
    /// Applies the command on `conn` and keeps its value for [`Job::answer`]. Returns the command's events,
    /// built only if `wants_events`.
    fn apply(&mut self, conn: &Connection, wants_events: bool) -> Result<Vec<PeerEvent>, StoreError>;
    /// Records that the command failed (its changes were rolled back); the failure is its answer.
    fn fail(&mut self, error: StoreError);
    /// Whether the command's own changes are in the transaction.
    fn applied(&self) -> bool;
    /// Sends the caller its answer given the COMMIT's outcome (`Err(reason)` when the commit failed or the
    /// transaction never started).
    fn answer(self: Box<Self>, commit: Result<(), &str>);
}

/// The one [`Job`] implementation: `apply` is the command's change as a closure over its input.
struct Pending<T, A> {
    apply: A,
    reply: Option<Reply<T>>,
    /// The command's result in the current attempt at the transaction; `None` until it ran.
    outcome: Option<Result<T, StoreError>>,
}

fn job<T, A>(reply: Option<Reply<T>>, apply: A) -> Box<dyn Job>
where
    T: 'static,
    A: FnMut(&Connection, bool) -> Result<(T, Vec<PeerEvent>), StoreError> + 'static,
{
    Box::new(Pending { apply, reply, outcome: None })
}

impl<T, A> Job for Pending<T, A>
where
    A: FnMut(&Connection, bool) -> Result<(T, Vec<PeerEvent>), StoreError>,
{
    fn apply(&mut self, conn: &Connection, wants_events: bool) -> Result<Vec<PeerEvent>, StoreError> {
        let (value, events) = (self.apply)(conn, wants_events)?;
        self.outcome = Some(Ok(value));
        Ok(events)
    }

    fn fail(&mut self, error: StoreError) {
        self.outcome = Some(Err(error));
    }

    fn applied(&self) -> bool {
        matches!(self.outcome, Some(Ok(_)))
    }

    fn answer(self: Box<Self>, commit: Result<(), &str>) {
        let Some(reply) = self.reply else { return };
        let answer = match (self.outcome, commit) {
            // The command's own failure is what its caller needs to know, whatever happened to the batch.
            (Some(Err(error)), _) => Err(error),
            (_, Err(reason)) => Err(StoreError::WriteFailed(reason.to_owned())),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (None, Ok(())) => Err(StoreError::WriteFailed(
                "the write was not applied although its batch committed; this is a bug, please report it"
                    .to_owned(),
            )),
        };
        // The caller may have stopped waiting; the write stands regardless.
        let _ = reply.send(answer);
    }
}

impl Command {
    /// The command as a [`Job`] of its batch, with the bounds it needs from `config`.
    fn into_job(self, config: &WriterConfig) -> Box<dyn Job> {
        match self {
            Command::Upsert { upsert, reply } => job(Some(reply), move |conn, wants_events| {
                let (outcome, _, events) = apply_upsert(conn, &upsert, wants_events)?;
                Ok((outcome, events))
            }),
            Command::UpsertVerified { upsert, quality, reply } => {
                job(Some(reply), move |conn, wants_events| {
                    apply_upsert_verified(conn, &upsert, quality.as_ref(), wants_events)
                })
            }
            Command::RecordQuality { node_id, sample, reply } => {
                job(Some(reply), move |conn, wants_events| {
                    apply_quality(conn, &node_id, &sample, wants_events)
                })
            }
            Command::Forget { node_id, reply } => {
                job(Some(reply), move |conn, _| apply_forget(conn, &node_id))
            }
            Command::JoinTopic { topic, now_ms, reply } => {
                let max = config.limits.max_joined_topics.load(Ordering::Relaxed);
                job(Some(reply), move |conn, _| apply_join_topic(conn, &topic, now_ms, max))
            }
            Command::LeaveTopic { topic, reply } => {
                job(Some(reply), move |conn, _| apply_leave_topic(conn, &topic))
            }
            Command::Prune { now_ms, reply } => {
                let retention_ms = config.limits.retention_ms.load(Ordering::Relaxed);
                let max_peers = config.limits.max_peers.load(Ordering::Relaxed);
                job(reply, move |conn, _| apply_prune(conn, now_ms, retention_ms, max_peers))
            }
            Command::NextRecordSeq { floor, reply } => {
                job(Some(reply), move |conn, _| apply_next_record_seq(conn, floor))
            }
            Command::RecordPunch { outcome, reply } => {
                job(Some(reply), move |conn, _| apply_record_punch(conn, &outcome))
            }
            #[cfg(test)]
            Command::Execute { sql, reply } => job(Some(reply), move |conn, _| {
                conn.execute_batch(&sql)?;
                Ok(((), Vec::new()))
            }),
        }
    }
}

struct BatchContext<'a> {
    events: &'a broadcast::Sender<PeerEvent>,
    status: &'a WriterStatus,
    checkpointer: &'a Checkpointer,
}

impl BatchContext<'_> {
    fn run_batch(&mut self, conn: &mut Connection, jobs: Vec<Box<dyn Job>>) {
        // One span per transaction: how big batches get and how long commits take is what an operator tuning
        // the store (or hunting a slow disk) wants to see in traces (and, as histograms, in metrics).
        let _span = tracing::info_span!("store.write_batch", commands = jobs.len()).entered();
        let started = Instant::now();
        let batch_size = jobs.len();
        let mut jobs = jobs;
        // Events cost a query each for most commands; nobody listening means nobody can miss them. (A
        // subscriber that subscribed before submitting a write is counted here, so it still gets that write's
        // events: that is the promise of `Store::subscribe`.)
        let wants_events = self.events.receiver_count() > 0;

        // First attempt: every command straight in the transaction. If one fails, its partial changes cannot
        // be undone alone, so the transaction is rolled back and the batch replayed with a savepoint per
        // command. Savepoints are not used up front because they are costly in SQLite: each one copies every
        // page it changes into a statement journal, which made up most of the writer's time.
        let result = self.attempt(conn, &mut jobs, wants_events, false).unwrap_or_else(|| {
            self.attempt(conn, &mut jobs, wants_events, true).unwrap_or_else(|| {
                Attempt::Failed(
                    "a write failed outside of its savepoint; this is a bug, please report it".into(),
                )
            })
        });

        match result {
            Attempt::Committed { events, environment_failure } => {
                let applied = jobs.iter().filter(|job| job.applied()).count() as u64;
                self.status.writes_committed.fetch_add(applied, Ordering::Relaxed);
                self.status.write_batches.fetch_add(1, Ordering::Relaxed);
                self.status.batch_size.observe(batch_size as f64);
                self.status.batch_seconds.observe_duration(started.elapsed());
                self.checkpointer.nudge();
                self.status.set_health(match environment_failure {
                    Some(reason) => StoreHealth::Degraded(reason),
                    None => StoreHealth::Ok,
                });
                // Events go out before the answers, so that once a write returned, its events are already
                // queued to every subscriber and a subscriber that joins later never sees them. (Sending to a
                // broadcast channel never blocks, so answers are not delayed.)
                for event in events {
                    // No subscriber is not an error: events are a convenience for whoever listens.
                    let _ = self.events.send(event);
                }
                for job in jobs {
                    job.answer(Ok(()));
                }
            }
            Attempt::Failed(reason) => {
                // Nothing of the batch was committed: every caller learns why.
                self.status.set_health(StoreHealth::Degraded(reason.clone()));
                for job in jobs {
                    job.answer(Err(&reason));
                }
            }
        }
    }

    /// One attempt at applying `jobs` in one IMMEDIATE transaction and committing it. Without savepoints, the
    /// first failing command aborts the attempt: it returns `None` and nothing is committed. With them, a
    /// failing command is rolled back alone and the rest commits, so the answer is always `Some`.
    fn attempt(
        &mut self,
        conn: &mut Connection,
        jobs: &mut [Box<dyn Job>],
        wants_events: bool,
        savepoints: bool,
    ) -> Option<Attempt> {
        let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(error) => return Some(Attempt::Failed(describe_write_failure(&error))),
        };
        let mut events = Vec::new();
        let mut environment_failure = None;
        for job in jobs.iter_mut() {
            if !savepoints {
                match job.apply(&tx, wants_events) {
                    Ok(job_events) => events.extend(job_events),
                    // Dropping `tx` rolls the attempt back.
                    Err(_) => return None,
                }
                continue;
            }
            match in_savepoint(&mut tx, |conn| job.apply(conn, wants_events)) {
                Ok(job_events) => events.extend(job_events),
                Err(error) => {
                    let (error, failure) = classify(error);
                    environment_failure = environment_failure.or(failure);
                    job.fail(error);
                }
            }
        }
        Some(match tx.commit() {
            Ok(()) => Attempt::Committed { events, environment_failure },
            Err(error) => Attempt::Failed(describe_write_failure(&error)),
        })
    }
}

/// How an attempt at a batch's transaction ended.
enum Attempt {
    /// Committed; `events` are those of the commands applied, in order.
    Committed { events: Vec<PeerEvent>, environment_failure: Option<String> },
    /// The transaction could not start or commit; nothing was written. The text says why.
    Failed(String),
}

/// Runs `apply` inside a savepoint: released when it succeeds, rolled back when it fails, so that a failing
/// command leaves no partial change behind while the rest of the batch goes on.
fn in_savepoint<T>(
    tx: &mut rusqlite::Transaction<'_>,
    apply: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let savepoint = tx.savepoint()?;
    match apply(&savepoint) {
        Ok(done) => {
            savepoint.commit()?;
            Ok(done)
        }
        Err(error) => {
            // finish() rolls back to the savepoint, then releases it (the default drop behaviour).
            if let Err(rollback_error) = savepoint.finish() {
                tracing::warn!(%rollback_error, "rolling back a failed peer store write failed");
            }
            Err(error)
        }
    }
}

/// Separates failures of the database or disk (which make the store unhealthy and are reported as
/// [`StoreError::WriteFailed`] with advice) from failures caused by the command itself.
fn classify(error: StoreError) -> (StoreError, Option<String>) {
    match error {
        StoreError::Sqlite(error) if is_environment_failure(&error) => {
            let reason = describe_write_failure(&error);
            (StoreError::WriteFailed(reason.clone()), Some(reason))
        }
        other => (other, None),
    }
}

fn is_environment_failure(error: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        error.sqlite_error_code(),
        Some(
            DiskFull
                | SystemIoFailure
                | ReadOnly
                | DatabaseCorrupt
                | NotADatabase
                | CannotOpen
                | PermissionDenied
                | DatabaseBusy
                | DatabaseLocked
                | OutOfMemory
                | FileLockingProtocolFailed
        )
    )
}

/// Says why writing failed and what would fix it, for [`StoreError::WriteFailed`] and [`StoreHealth`].
pub(crate) fn describe_write_failure(error: &rusqlite::Error) -> String {
    use rusqlite::ErrorCode::*;
    let advice = match error.sqlite_error_code() {
        Some(DiskFull) => {
            "free space on the disk that holds the peer store; writes resume once a commit succeeds"
        }
        Some(ReadOnly | PermissionDenied) => {
            "the database file or its directory became read-only: make them writable by the daemon's user again"
        }
        Some(SystemIoFailure) => "the disk reported an I/O error: check the disk and the system log",
        Some(DatabaseCorrupt | NotADatabase) => {
            "the database is damaged: stop the node and restore a backup or move the file away"
        }
        Some(DatabaseBusy | DatabaseLocked | FileLockingProtocolFailed) => {
            "another process holds the database locked: make sure only one node uses this store"
        }
        Some(OutOfMemory) => "the system is out of memory",
        _ => "see the log for details",
    };
    format!("{error}; {advice}")
}
