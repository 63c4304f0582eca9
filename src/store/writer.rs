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
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::api::names::{NodeId, validate_topic};

use super::StoreError;
use super::checkpoint::Checkpointer;
use super::codec::{
    self, MAX_ERROR_BYTES, duration_from_micros, duration_to_micros, encode_attributes, node_id_from_blob,
    truncate_on_char_boundary, u64_from_stored, u64_to_stored,
};
use super::read;
use super::types::{
    JoinedTopic, NatType, NodeType, PeerEvent, PeerSummary, PeerUpsert, PunchOutcome, QualitySample,
    StoreHealth, UpsertOutcome,
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
struct PeerId(i64);

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

/// Inserts a new peer or merges into the stored one according to seq (see [`PeerUpsert::seq`]). Returns the
/// peer's id with the outcome.
///
/// The insert is tried first: in a burst of discoveries most peers are new, and for those the INSERT alone
/// both checks and writes (a SELECT first would look the peer up twice).
fn apply_upsert(
    conn: &Connection,
    upsert: &PeerUpsert,
    wants_events: bool,
) -> Result<(UpsertOutcome, PeerId, Vec<PeerEvent>), StoreError> {
    let node_id = upsert.node_id.as_bytes().as_slice();
    let seq = u64_to_stored(upsert.seq);
    let inserted = conn
        .prepare_cached(
            "INSERT INTO peers (node_id, seq, record, first_seen, last_seen, node_type, nat_type, score)
             VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6, 0) ON CONFLICT (node_id) DO NOTHING",
        )?
        .execute(params![
            node_id,
            seq,
            upsert.record,
            upsert.seen_at_ms,
            upsert.node_type as i64,
            upsert.nat_type as i64
        ])?;
    if inserted == 1 {
        // The connection runs nothing else in between: this is the id the INSERT just assigned.
        let id = PeerId(conn.last_insert_rowid());
        let topics = insert_record_details(conn, id, upsert)?;
        merge_addresses(conn, id, upsert, true)?;
        // Everything the summary shows was just written from the upsert: no need to read it back.
        let events = if wants_events {
            vec![PeerEvent::Added(PeerSummary {
                node_id: upsert.node_id,
                seq: upsert.seq,
                first_seen_ms: upsert.seen_at_ms,
                last_seen_ms: upsert.seen_at_ms,
                node_type: NodeType::from_stored(upsert.node_type as i64),
                nat_type: NatType::from_stored(upsert.nat_type as i64),
                topics,
                score: 0.0,
            })]
        } else {
            Vec::new()
        };
        return Ok((UpsertOutcome::Added, id, events));
    }

    let (id, stored_seq): (i64, i64) = conn
        .prepare_cached("SELECT id, seq FROM peers WHERE node_id = ?1")?
        .query_row([node_id], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let id = PeerId(id);
    match u64_from_stored(stored_seq) {
        stored_seq if stored_seq > upsert.seq => {
            return Ok((UpsertOutcome::Stale { stored_seq }, id, Vec::new()));
        }
        stored_seq if stored_seq == upsert.seq => {
            conn.prepare_cached("UPDATE peers SET last_seen = max(last_seen, ?2) WHERE id = ?1")?
                .execute(params![id.0, upsert.seen_at_ms])?;
        }
        _ => {
            conn.prepare_cached(
                "UPDATE peers SET seq = ?2, record = ?3, last_seen = max(last_seen, ?4), node_type = ?5,
                 nat_type = ?6 WHERE id = ?1",
            )?
            .execute(params![
                id.0,
                seq,
                upsert.record,
                upsert.seen_at_ms,
                upsert.node_type as i64,
                upsert.nat_type as i64
            ])?;
            for sql in [
                "DELETE FROM peer_topics WHERE peer = ?1",
                "DELETE FROM peer_capabilities WHERE peer = ?1",
                "DELETE FROM peer_services WHERE peer = ?1",
            ] {
                conn.prepare_cached(sql)?.execute([id.0])?;
            }
            insert_record_details(conn, id, upsert)?;
        }
    }
    merge_addresses(conn, id, upsert, false)?;

    let events = if wants_events {
        read::peer_summary(conn, &upsert.node_id)?.map(PeerEvent::Updated).into_iter().collect()
    } else {
        Vec::new()
    };
    Ok((UpsertOutcome::Updated, id, events))
}

/// An upsert followed, unless it was stale, by its connection's quality sample: the same changes and events
/// as the two commands one after the other, without looking the peer up again.
fn apply_upsert_verified(
    conn: &Connection,
    upsert: &PeerUpsert,
    quality: Option<&QualitySample>,
    wants_events: bool,
) -> Result<(UpsertOutcome, Vec<PeerEvent>), StoreError> {
    let (outcome, id, mut events) = apply_upsert(conn, upsert, wants_events)?;
    if let Some(sample) = quality
        && !matches!(outcome, UpsertOutcome::Stale { .. })
    {
        let ((), quality_events) = apply_known_quality(conn, id, &upsert.node_id, sample, wants_events)?;
        events.extend(quality_events);
    }
    Ok((outcome, events))
}

/// Writes what a record carries (topics, capabilities and services) for a peer that has none stored. Returns
/// the topics as stored: valid ones, sorted, without duplicates.
fn insert_record_details(
    conn: &Connection,
    id: PeerId,
    upsert: &PeerUpsert,
) -> Result<Vec<String>, StoreError> {
    let id = id.0;

    let mut topics: Vec<String> = Vec::with_capacity(upsert.topics.len());
    let mut insert_topic =
        conn.prepare_cached("INSERT OR IGNORE INTO peer_topics (peer, topic) VALUES (?1, ?2)")?;
    for topic in &upsert.topics {
        // Listing joins topics with U+001F, which the topic rule excludes; a topic breaking the rule would
        // corrupt that, so it is dropped here whatever let it through.
        if let Err(reason) = validate_topic(topic) {
            tracing::debug!(node_id = %upsert.node_id, %reason, "ignoring an invalid topic of a peer");
            continue;
        }
        insert_topic.execute(params![id, topic])?;
        topics.push(topic.clone());
    }
    topics.sort();
    topics.dedup();

    if let Some(capabilities) = &upsert.capabilities {
        conn.prepare_cached(
            "INSERT INTO peer_capabilities (peer, os, arch, cpu_cores, memory_bytes, software_version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            id,
            capabilities.os,
            capabilities.arch,
            capabilities.cpu_cores,
            u64_to_stored(capabilities.memory_bytes),
            capabilities.software_version
        ])?;
    }

    if !upsert.services.is_empty() {
        let mut insert_service = conn.prepare_cached(
            "INSERT INTO peer_services (peer, position, name, version, attributes) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for (position, service) in upsert.services.iter().enumerate() {
            let mut attributes = service.attributes.clone();
            attributes.sort_by(|a, b| a.0.cmp(&b.0));
            insert_service.execute(params![
                id,
                position as i64,
                service.name,
                service.version,
                encode_attributes(&attributes)
            ])?;
        }
    }
    Ok(topics)
}

/// Deletes a peer's addresses beyond the [`MAX_ADDRESSES_PER_PEER`] best. The bound is written into the SQL
/// rather than bound as a parameter: SQLite re-prepares a statement whenever a parameter of its LIMIT is bound
/// again, which cost a full parse and plan on every upsert (a test checks the two numbers agree).
const TRIM_ADDRESSES_SQL: &str = "DELETE FROM peer_addresses WHERE peer = ?1 AND address NOT IN (
     SELECT address FROM peer_addresses WHERE peer = ?1
     ORDER BY last_success IS NULL, last_success DESC, consecutive_failures ASC, first_seen DESC, address
     LIMIT 32)";

/// Adds the upsert's addresses that are new (an address first learned with an unknown source takes the first
/// known one), then trims the peer back to [`MAX_ADDRESSES_PER_PEER`]. Kept first: addresses that succeeded,
/// most recent success first; then fewest consecutive failures; then the most recently learned. So a flood of
/// made-up addresses can only displace addresses that never worked, and known-good ones survive it.
///
/// `new_peer` says the peer had no addresses before, so the rows inserted here are all it has.
fn merge_addresses(
    conn: &Connection,
    id: PeerId,
    upsert: &PeerUpsert,
    new_peer: bool,
) -> Result<(), StoreError> {
    if upsert.addresses.is_empty() {
        return Ok(());
    }
    let id = id.0;
    let mut insert = conn.prepare_cached(
        "INSERT INTO peer_addresses (peer, address, source, first_seen) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (peer, address) DO UPDATE SET source = excluded.source
         WHERE peer_addresses.source = 0",
    )?;
    let mut inserted = 0i64;
    for (address, source) in &upsert.addresses {
        inserted += insert.execute(params![id, address, *source as i64, upsert.seen_at_ms])? as i64;
    }
    // Trimming sorts the peer's addresses: only worth it when they may be over the bound.
    let stored = if new_peer {
        inserted
    } else {
        conn.prepare_cached("SELECT COUNT(*) FROM peer_addresses WHERE peer = ?1")?
            .query_row([id], |row| row.get(0))?
    };
    if stored > MAX_ADDRESSES_PER_PEER {
        conn.prepare_cached(TRIM_ADDRESSES_SQL)?.execute([id])?;
    }
    Ok(())
}

/// The next smoothed round trip time, in microseconds: like TCP's SRTT (RFC 6298), each sample moves the
/// average by 1/8 of the difference; the first sample sets it.
pub(crate) fn next_rtt_ewma_us(previous_us: Option<i64>, sample_us: i64) -> i64 {
    match previous_us {
        None => sample_us,
        Some(previous) => previous.saturating_add(sample_us.saturating_sub(previous) / 8),
    }
}

/// A peer's score, used to order peers from most to least useful:
///
/// `score = successes / (successes + failures + 1) × 1 / (1 + rtt_ms / 1000)`
///
/// The first factor is the success ratio, pulled towards 0 while there are few attempts (the `+ 1`); the second
/// halves the score for each second of smoothed round trip time, and is 1 while no RTT was measured. Both
/// factors lie in [0, 1], so the score does too (and is 0 for a peer never reached).
pub(crate) fn score(successes: u64, failures: u64, rtt: Option<Duration>) -> f64 {
    let successes = successes as f64;
    let attempts = successes + failures as f64 + 1.0;
    let rtt_ms = rtt.map_or(0.0, |rtt| rtt.as_secs_f64() * 1000.0);
    let value = successes / attempts / (1.0 + rtt_ms / 1000.0);
    if value.is_finite() { value.clamp(0.0, 1.0) } else { 0.0 }
}

/// Folds one connection attempt into the peer's quality and score. Samples for unknown peers are dropped:
/// quality is only kept for peers the store knows.
fn apply_quality(
    conn: &Connection,
    node_id: &NodeId,
    sample: &QualitySample,
    wants_events: bool,
) -> Result<((), Vec<PeerEvent>), StoreError> {
    let id = conn
        .prepare_cached("SELECT id FROM peers WHERE node_id = ?1")?
        .query_row([node_id.as_bytes().as_slice()], |row| row.get(0))
        .optional()?;
    let Some(id) = id else {
        return Ok(((), Vec::new()));
    };
    apply_known_quality(conn, PeerId(id), node_id, sample, wants_events)
}

/// [`apply_quality`] for a peer known to be stored under `id`.
fn apply_known_quality(
    conn: &Connection,
    id: PeerId,
    node_id: &NodeId,
    sample: &QualitySample,
    wants_events: bool,
) -> Result<((), Vec<PeerEvent>), StoreError> {
    let id = id.0;
    conn.prepare_cached("INSERT OR IGNORE INTO peer_quality (peer) VALUES (?1)")?.execute([id])?;

    match &sample.outcome {
        Ok(rtt) => {
            if let Some(rtt) = rtt {
                let previous: Option<i64> = conn
                    .prepare_cached("SELECT rtt_ewma_us FROM peer_quality WHERE peer = ?1")?
                    .query_row([id], |row| row.get(0))?;
                let ewma = next_rtt_ewma_us(previous, duration_to_micros(*rtt));
                conn.prepare_cached(
                    "UPDATE peer_quality SET rtt_ewma_us = ?2, rtt_samples = rtt_samples + 1 WHERE peer = ?1",
                )?
                .execute(params![id, ewma])?;
            }
            // max(): samples may arrive out of order; the latest success is what matters.
            conn.prepare_cached(
                "UPDATE peer_quality SET successes = successes + 1,
                 last_success_at = max(coalesce(last_success_at, ?2), ?2) WHERE peer = ?1",
            )?
            .execute(params![id, sample.at_ms])?;
            if let Some(address) = &sample.address {
                conn.prepare_cached(
                    "UPDATE peer_addresses SET last_success = max(coalesce(last_success, ?3), ?3),
                     consecutive_failures = 0 WHERE peer = ?1 AND address = ?2",
                )?
                .execute(params![id, address, sample.at_ms])?;
            }
        }
        Err(message) => {
            let message = truncate_on_char_boundary(message, MAX_ERROR_BYTES);
            conn.prepare_cached(
                "UPDATE peer_quality SET failures = failures + 1, last_error = ?2, last_error_at = ?3
                 WHERE peer = ?1",
            )?
            .execute(params![id, message, sample.at_ms])?;
            if let Some(address) = &sample.address {
                conn.prepare_cached(
                    "UPDATE peer_addresses SET last_failure = max(coalesce(last_failure, ?3), ?3),
                     consecutive_failures = consecutive_failures + 1 WHERE peer = ?1 AND address = ?2",
                )?
                .execute(params![id, address, sample.at_ms])?;
            }
        }
    }

    let (successes, failures, rtt_us): (i64, i64, Option<i64>) = conn
        .prepare_cached("SELECT successes, failures, rtt_ewma_us FROM peer_quality WHERE peer = ?1")?
        .query_row([id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    let score = score(
        codec::count_from_stored(successes),
        codec::count_from_stored(failures),
        rtt_us.map(duration_from_micros),
    );
    conn.prepare_cached("UPDATE peers SET score = ?2 WHERE id = ?1")?.execute(params![id, score])?;

    if !wants_events {
        return Ok(((), Vec::new()));
    }
    let events = read::peer_summary(conn, node_id)?.map(PeerEvent::Updated).into_iter().collect();
    Ok(((), events))
}

/// Deletes a peer and, through the foreign keys' cascade, everything about it.
fn apply_forget(conn: &Connection, node_id: &NodeId) -> Result<(bool, Vec<PeerEvent>), StoreError> {
    let deleted = conn
        .prepare_cached("DELETE FROM peers WHERE node_id = ?1")?
        .execute([node_id.as_bytes().as_slice()])?;
    if deleted == 0 {
        return Ok((false, Vec::new()));
    }
    Ok((true, vec![PeerEvent::Removed(*node_id)]))
}

fn apply_join_topic(
    conn: &Connection,
    topic: &str,
    now_ms: i64,
    max_joined_topics: u64,
) -> Result<((JoinedTopic, bool), Vec<PeerEvent>), StoreError> {
    validate_topic(topic)?;
    let existing: Option<i64> = conn
        .prepare_cached("SELECT joined_at FROM joined_topics WHERE topic = ?1")?
        .query_row([topic], |row| row.get(0))
        .optional()?;
    let (joined_at_ms, newly_joined) = match existing {
        Some(joined_at) => (joined_at, false),
        None => {
            let joined: i64 = conn.query_row("SELECT COUNT(*) FROM joined_topics", [], |row| row.get(0))?;
            if codec::count_from_stored(joined) >= max_joined_topics {
                return Err(StoreError::TooManyTopics { max: max_joined_topics });
            }
            conn.prepare_cached("INSERT INTO joined_topics (topic, joined_at) VALUES (?1, ?2)")?
                .execute(params![topic, now_ms])?;
            (now_ms, true)
        }
    };
    let peers = read::topic_peer_count(conn, topic)?;
    let joined = JoinedTopic { name: topic.to_owned(), joined_at_ms, peers };
    Ok(((joined, newly_joined), Vec::new()))
}

/// The `node_state` key holding the seq of the node's own latest metadata record (8 bytes, big-endian).
const RECORD_SEQ_KEY: &str = "record_seq";

/// Takes the next seq for the node's own record: above every seq issued before (so peers never see it go
/// back, even after a restart) and at least `floor` (the caller passes the clock, so seqs stay increasing even
/// if this database is lost).
fn apply_next_record_seq(conn: &Connection, floor: u64) -> Result<(u64, Vec<PeerEvent>), StoreError> {
    let stored: Option<Vec<u8>> = conn
        .prepare_cached("SELECT value FROM node_state WHERE key = ?1")?
        .query_row([RECORD_SEQ_KEY], |row| row.get(0))
        .optional()?;
    let previous =
        stored.and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok()).map(u64::from_be_bytes);
    let next = previous.map_or(floor, |seq| seq.saturating_add(1).max(floor)).max(1);
    conn.prepare_cached("INSERT INTO node_state (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")?
        .execute(params![RECORD_SEQ_KEY, next.to_be_bytes().as_slice()])?;
    Ok((next, Vec::new()))
}

/// Counts one punch attempt for its pair of NAT types.
fn apply_record_punch(conn: &Connection, outcome: &PunchOutcome) -> Result<((), Vec<PeerEvent>), StoreError> {
    conn.prepare_cached(
        "INSERT INTO punch_stats (our_nat, their_nat, attempts, successes, last_outcome, last_at, last_success_ms)
         VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6)
         ON CONFLICT (our_nat, their_nat) DO UPDATE SET
             attempts = attempts + 1,
             successes = successes + excluded.successes,
             last_outcome = excluded.last_outcome,
             last_at = excluded.last_at,
             last_success_ms = coalesce(excluded.last_success_ms, last_success_ms)",
    )?
    .execute(params![
        outcome.our_nat,
        outcome.their_nat,
        i64::from(outcome.time_to_connected_ms.is_some()),
        outcome.detail,
        outcome.at_ms,
        outcome.time_to_connected_ms.map(|ms| i64::try_from(ms).unwrap_or(i64::MAX)),
    ])?;
    Ok(((), Vec::new()))
}

fn apply_leave_topic(conn: &Connection, topic: &str) -> Result<(bool, Vec<PeerEvent>), StoreError> {
    let deleted = conn.prepare_cached("DELETE FROM joined_topics WHERE topic = ?1")?.execute([topic])?;
    Ok((deleted > 0, Vec::new()))
}

/// Deletes peers not seen within the retention, then the least recently seen beyond `max_peers`.
fn apply_prune(
    conn: &Connection,
    now_ms: i64,
    retention_ms: i64,
    max_peers: u64,
) -> Result<(u64, Vec<PeerEvent>), StoreError> {
    let cutoff = now_ms.saturating_sub(retention_ms);
    let mut removed =
        delete_returning_ids(conn, "DELETE FROM peers WHERE last_seen < ?1 RETURNING node_id", cutoff)?;

    let stored: i64 = conn.query_row("SELECT COUNT(*) FROM peers", [], |row| row.get(0))?;
    let excess = codec::count_from_stored(stored).saturating_sub(max_peers);
    if excess > 0 {
        removed.extend(delete_returning_ids(
            conn,
            "DELETE FROM peers WHERE id IN (
                 SELECT id FROM peers ORDER BY last_seen ASC, node_id ASC LIMIT ?1)
             RETURNING node_id",
            i64::try_from(excess).unwrap_or(i64::MAX),
        )?);
    }
    if !removed.is_empty() {
        tracing::debug!(removed = removed.len(), "pruned peers");
    }
    let count = removed.len() as u64;
    let events = removed.into_iter().map(PeerEvent::Removed).collect();
    Ok((count, events))
}

/// Runs a `DELETE … RETURNING node_id` with one parameter and collects the ids (a malformed stored id is
/// deleted like any other but cannot be reported in an event).
fn delete_returning_ids(conn: &Connection, sql: &str, param: i64) -> Result<Vec<NodeId>, StoreError> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query([param])?;
    let mut ids = Vec::new();
    while let Some(row) = rows.next()? {
        if let rusqlite::types::ValueRef::Blob(blob) = row.get_ref(0)?
            && let Some(id) = node_id_from_blob(blob)
        {
            ids.push(id);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trim_statement_keeps_the_address_bound() {
        assert!(TRIM_ADDRESSES_SQL.ends_with(&format!("LIMIT {MAX_ADDRESSES_PER_PEER})")));
    }

    #[test]
    fn ewma_follows_tcp_srtt() {
        assert_eq!(next_rtt_ewma_us(None, 100_000), 100_000);
        assert_eq!(next_rtt_ewma_us(Some(100_000), 200_000), 112_500);
        assert_eq!(next_rtt_ewma_us(Some(112_500), 0), 112_500 - 14_062);
    }

    #[test]
    fn score_stays_within_unit_interval() {
        assert_eq!(score(0, 0, None), 0.0);
        assert_eq!(score(0, 100, Some(Duration::from_millis(10))), 0.0);
        assert!((score(1, 0, None) - 0.5).abs() < 1e-12);
        assert!((score(3, 0, Some(Duration::from_secs(1))) - 0.375).abs() < 1e-12);
        for (s, f, rtt) in [
            (u64::MAX, 0, None),
            (u64::MAX, u64::MAX, Some(Duration::MAX)),
            (5, 7, Some(Duration::ZERO)),
            (1_000_000, 0, Some(Duration::from_micros(1))),
        ] {
            let value = score(s, f, rtt);
            assert!((0.0..=1.0).contains(&value), "{value} out of range");
        }
    }
}
