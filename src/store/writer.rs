//! The single writer: one OS thread that owns the only write connection and applies every change.
//!
//! It waits for a command, drains whatever else is already queued (up to `max_batch`) and applies the lot in
//! one IMMEDIATE transaction, so a burst of small writes costs one commit (one WAL fsync at most) instead of
//! one each. Each command runs inside its own SAVEPOINT: a command that fails for its own reasons (e.g. too
//! many topics) is rolled back alone and the rest of the batch still commits. Callers are answered only after
//! COMMIT returned, right after the batch's [`PeerEvent`]s were broadcast, so whoever reacts to an event or an
//! answer can already read the change through the pool, and a write that returned has had its events sent.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::api::names::{NodeId, validate_topic};

use super::StoreError;
use super::codec::{
    self, MAX_ERROR_BYTES, duration_from_micros, duration_to_micros, encode_attributes, node_id_from_blob,
    truncate_on_char_boundary, u64_from_stored, u64_to_stored,
};
use super::read;
use super::types::{JoinedTopic, PeerEvent, PeerUpsert, QualitySample, StoreHealth, UpsertOutcome};

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
    /// Runs raw SQL inside the batch, so tests can provoke failures (e.g. a full database).
    #[cfg(test)]
    Execute {
        sql: String,
        reply: Reply<()>,
    },
}

/// The bounds the writer enforces, taken from [`super::StoreOptions`].
pub(crate) struct WriterConfig {
    pub retention_ms: i64,
    pub max_peers: u64,
    pub max_joined_topics: u64,
    pub max_batch: usize,
}

/// What the writer reports to the handles: health and the counters shown in stats.
#[derive(Debug)]
pub(crate) struct WriterStatus {
    health: Mutex<StoreHealth>,
    pub writes_committed: AtomicU64,
    pub write_batches: AtomicU64,
}

impl WriterStatus {
    pub(crate) fn new() -> Self {
        Self {
            health: Mutex::new(StoreHealth::Ok),
            writes_committed: AtomicU64::new(0),
            write_batches: AtomicU64::new(0),
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
        let Writer { mut conn, mut commands, config, events, status, stopped } = self;
        let _stopped = StoppedSignal(stopped);
        let max_batch = config.max_batch.max(1);
        let mut context = BatchContext { config: &config, events: &events, status: &status };

        // Prune once at start: a node that was down for a long time should not serve stale peers until the
        // first periodic prune.
        context.run_batch(&mut conn, vec![Command::Prune { now_ms: now_ms(), reply: None }]);

        while let Some(first) = commands.blocking_recv() {
            let mut batch = Vec::with_capacity(16);
            batch.push(first);
            while batch.len() < max_batch {
                match commands.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            context.run_batch(&mut conn, batch);
        }

        // Closing explicitly checkpoints the WAL into the database file; a failure only leaves the WAL for the
        // next open to replay, so it is logged, not fatal.
        if let Err((_, error)) = conn.close() {
            tracing::warn!(%error, "closing the peer store's write connection failed");
        }
        tracing::debug!("peer store writer stopped");
    }
}

pub(crate) use crate::clock::now_ms;

/// A command that was applied (or refused) inside the transaction and waits for the COMMIT's outcome.
struct Settled {
    /// Whether the command's own changes were applied (and so are committed with the batch).
    applied: bool,
    /// Set when the command failed because of the database or disk rather than its own input.
    environment_failure: Option<String>,
    events: Vec<PeerEvent>,
    answer: Answer,
}

/// Sends a caller its answer given the COMMIT's outcome (`Err(reason)` when the commit failed).
type Answer = Box<dyn FnOnce(Result<(), &str>)>;

struct BatchContext<'a> {
    config: &'a WriterConfig,
    events: &'a broadcast::Sender<PeerEvent>,
    status: &'a WriterStatus,
}

impl BatchContext<'_> {
    fn run_batch(&mut self, conn: &mut Connection, batch: Vec<Command>) {
        // One span per transaction: how big batches get and how long commits take is what an operator tuning
        // the store (or hunting a slow disk) wants to see in traces.
        let _span = tracing::info_span!("store.write_batch", commands = batch.len()).entered();
        let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(error) => {
                let reason = describe_write_failure(&error);
                self.status.set_health(StoreHealth::Degraded(reason.clone()));
                for command in batch {
                    command.fail(&reason);
                }
                return;
            }
        };

        let mut settled: Vec<Settled> =
            batch.into_iter().map(|command| self.execute(&mut tx, command)).collect();

        match tx.commit() {
            Ok(()) => {
                let applied = settled.iter().filter(|s| s.applied).count() as u64;
                self.status.writes_committed.fetch_add(applied, Ordering::Relaxed);
                self.status.write_batches.fetch_add(1, Ordering::Relaxed);
                let environment_failure = settled.iter().find_map(|s| s.environment_failure.clone());
                self.status.set_health(match environment_failure {
                    Some(reason) => StoreHealth::Degraded(reason),
                    None => StoreHealth::Ok,
                });
                // Events go out before the answers, so that once a write returned, its events are already
                // queued to every subscriber and a subscriber that joins later never sees them. (Sending to a
                // broadcast channel never blocks, so answers are not delayed.)
                for done in &mut settled {
                    for event in std::mem::take(&mut done.events) {
                        // No subscriber is not an error: events are a convenience for whoever listens.
                        let _ = self.events.send(event);
                    }
                }
                for done in settled {
                    (done.answer)(Ok(()));
                }
            }
            Err(error) => {
                // The whole batch was rolled back: every caller learns why.
                let reason = describe_write_failure(&error);
                self.status.set_health(StoreHealth::Degraded(reason.clone()));
                for done in settled {
                    (done.answer)(Err(&reason));
                }
            }
        }
    }

    fn execute(&mut self, tx: &mut rusqlite::Transaction<'_>, command: Command) -> Settled {
        let config = self.config;
        match command {
            Command::Upsert { upsert, reply } => {
                in_savepoint(tx, Some(reply), |conn| apply_upsert(conn, &upsert))
            }
            Command::RecordQuality { node_id, sample, reply } => {
                in_savepoint(tx, Some(reply), |conn| apply_quality(conn, &node_id, &sample))
            }
            Command::Forget { node_id, reply } => {
                in_savepoint(tx, Some(reply), |conn| apply_forget(conn, &node_id))
            }
            Command::JoinTopic { topic, now_ms, reply } => in_savepoint(tx, Some(reply), |conn| {
                apply_join_topic(conn, &topic, now_ms, config.max_joined_topics)
            }),
            Command::LeaveTopic { topic, reply } => {
                in_savepoint(tx, Some(reply), |conn| apply_leave_topic(conn, &topic))
            }
            Command::Prune { now_ms, reply } => in_savepoint(tx, reply, |conn| {
                apply_prune(conn, now_ms, config.retention_ms, config.max_peers)
            }),
            Command::NextRecordSeq { floor, reply } => {
                in_savepoint(tx, Some(reply), |conn| apply_next_record_seq(conn, floor))
            }
            #[cfg(test)]
            Command::Execute { sql, reply } => in_savepoint(tx, Some(reply), |conn| {
                conn.execute_batch(&sql)?;
                Ok(((), Vec::new()))
            }),
        }
    }
}

impl Command {
    /// Answers the command with a write failure without running it.
    fn fail(self, reason: &str) {
        let error = || StoreError::WriteFailed(reason.to_owned());
        // A caller that stopped waiting (dropped its future) has nothing left to tell.
        match self {
            Command::Upsert { reply, .. } => drop(reply.send(Err(error()))),
            Command::RecordQuality { reply, .. } => drop(reply.send(Err(error()))),
            Command::Forget { reply, .. } => drop(reply.send(Err(error()))),
            Command::JoinTopic { reply, .. } => drop(reply.send(Err(error()))),
            Command::LeaveTopic { reply, .. } => drop(reply.send(Err(error()))),
            Command::NextRecordSeq { reply, .. } => drop(reply.send(Err(error()))),
            Command::Prune { reply, .. } => {
                if let Some(reply) = reply {
                    drop(reply.send(Err(error())));
                }
            }
            #[cfg(test)]
            Command::Execute { reply, .. } => drop(reply.send(Err(error()))),
        }
    }
}

/// Runs `apply` inside a savepoint: released when it succeeds, rolled back when it fails, so that a failing
/// command leaves no partial change behind while the rest of the batch goes on.
fn in_savepoint<T: 'static>(
    tx: &mut rusqlite::Transaction<'_>,
    reply: Option<Reply<T>>,
    apply: impl FnOnce(&Connection) -> Result<(T, Vec<PeerEvent>), StoreError>,
) -> Settled {
    let result = match tx.savepoint() {
        Err(error) => Err(StoreError::Sqlite(error)),
        Ok(savepoint) => match apply(&savepoint) {
            Ok(done) => savepoint.commit().map(|()| done).map_err(StoreError::Sqlite),
            Err(error) => {
                // finish() rolls back to the savepoint, then releases it (the default drop behaviour).
                if let Err(rollback_error) = savepoint.finish() {
                    tracing::warn!(%rollback_error, "rolling back a failed peer store write failed");
                }
                Err(error)
            }
        },
    };

    let (result, environment_failure) = classify(result);
    let applied = result.is_ok();
    let (result, events) = match result {
        Ok((value, events)) => (Ok(value), events),
        Err(error) => (Err(error), Vec::new()),
    };
    let answer = Box::new(move |commit: Result<(), &str>| {
        let answer = match (result, commit) {
            (Err(error), _) => Err(error),
            (Ok(_), Err(reason)) => Err(StoreError::WriteFailed(reason.to_owned())),
            (Ok(value), Ok(())) => Ok(value),
        };
        if let Some(reply) = reply {
            // The caller may have stopped waiting; the write stands regardless.
            let _ = reply.send(answer);
        }
    });
    Settled { applied, environment_failure, events, answer }
}

/// Separates failures of the database or disk (which make the store unhealthy and are reported as
/// [`StoreError::WriteFailed`] with advice) from failures caused by the command itself.
fn classify<T>(result: Result<T, StoreError>) -> (Result<T, StoreError>, Option<String>) {
    match result {
        Err(StoreError::Sqlite(error)) if is_environment_failure(&error) => {
            let reason = describe_write_failure(&error);
            (Err(StoreError::WriteFailed(reason.clone())), Some(reason))
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

/// Inserts a new peer or merges into the stored one according to seq (see [`PeerUpsert::seq`]).
fn apply_upsert(
    conn: &Connection,
    upsert: &PeerUpsert,
) -> Result<(UpsertOutcome, Vec<PeerEvent>), StoreError> {
    let id = upsert.node_id.as_bytes().as_slice();
    let stored_seq: Option<i64> = conn
        .prepare_cached("SELECT seq FROM peers WHERE node_id = ?1")?
        .query_row([id], |row| row.get(0))
        .optional()?;
    let seq = u64_to_stored(upsert.seq);
    let outcome = match stored_seq.map(u64_from_stored) {
        None => {
            conn.prepare_cached(
                "INSERT INTO peers (node_id, seq, record, first_seen, last_seen, node_type, nat_type, score)
                 VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6, 0)",
            )?
            .execute(params![
                id,
                seq,
                upsert.record,
                upsert.seen_at_ms,
                upsert.node_type as i64,
                upsert.nat_type as i64
            ])?;
            replace_record_details(conn, upsert)?;
            UpsertOutcome::Added
        }
        Some(stored_seq) if stored_seq > upsert.seq => {
            return Ok((UpsertOutcome::Stale { stored_seq }, Vec::new()));
        }
        Some(stored_seq) if stored_seq == upsert.seq => {
            conn.prepare_cached("UPDATE peers SET last_seen = max(last_seen, ?2) WHERE node_id = ?1")?
                .execute(params![id, upsert.seen_at_ms])?;
            UpsertOutcome::Updated
        }
        Some(_) => {
            conn.prepare_cached(
                "UPDATE peers SET seq = ?2, record = ?3, last_seen = max(last_seen, ?4), node_type = ?5,
                 nat_type = ?6 WHERE node_id = ?1",
            )?
            .execute(params![
                id,
                seq,
                upsert.record,
                upsert.seen_at_ms,
                upsert.node_type as i64,
                upsert.nat_type as i64
            ])?;
            replace_record_details(conn, upsert)?;
            UpsertOutcome::Updated
        }
    };
    merge_addresses(conn, upsert)?;

    let events = read::peer_summary(conn, &upsert.node_id)?
        .map(|summary| match outcome {
            UpsertOutcome::Added => PeerEvent::Added(summary),
            _ => PeerEvent::Updated(summary),
        })
        .into_iter()
        .collect();
    Ok((outcome, events))
}

/// Replaces what a record carries: topics, capabilities and services.
fn replace_record_details(conn: &Connection, upsert: &PeerUpsert) -> Result<(), StoreError> {
    let id = upsert.node_id.as_bytes().as_slice();

    conn.prepare_cached("DELETE FROM peer_topics WHERE node_id = ?1")?.execute([id])?;
    let mut insert_topic =
        conn.prepare_cached("INSERT OR IGNORE INTO peer_topics (node_id, topic) VALUES (?1, ?2)")?;
    for topic in &upsert.topics {
        // Listing joins topics with U+001F, which the topic rule excludes; a topic breaking the rule would
        // corrupt that, so it is dropped here whatever let it through.
        if let Err(reason) = validate_topic(topic) {
            tracing::debug!(node_id = %upsert.node_id, %reason, "ignoring an invalid topic of a peer");
            continue;
        }
        insert_topic.execute(params![id, topic])?;
    }

    conn.prepare_cached("DELETE FROM peer_capabilities WHERE node_id = ?1")?.execute([id])?;
    if let Some(capabilities) = &upsert.capabilities {
        conn.prepare_cached(
            "INSERT INTO peer_capabilities (node_id, os, arch, cpu_cores, memory_bytes, software_version)
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

    conn.prepare_cached("DELETE FROM peer_services WHERE node_id = ?1")?.execute([id])?;
    let mut insert_service = conn.prepare_cached(
        "INSERT INTO peer_services (node_id, position, name, version, attributes) VALUES (?1, ?2, ?3, ?4, ?5)",
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
    Ok(())
}

/// Adds the upsert's addresses that are new (an address first learned with an unknown source takes the first
/// known one), then trims the peer back to [`MAX_ADDRESSES_PER_PEER`]. Kept first: addresses that succeeded,
/// most recent success first; then fewest consecutive failures; then the most recently learned. So a flood of
/// made-up addresses can only displace addresses that never worked, and known-good ones survive it.
fn merge_addresses(conn: &Connection, upsert: &PeerUpsert) -> Result<(), StoreError> {
    if upsert.addresses.is_empty() {
        return Ok(());
    }
    let id = upsert.node_id.as_bytes().as_slice();
    let mut insert = conn.prepare_cached(
        "INSERT INTO peer_addresses (node_id, address, source, first_seen) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (node_id, address) DO UPDATE SET source = excluded.source
         WHERE peer_addresses.source = 0",
    )?;
    for (address, source) in &upsert.addresses {
        insert.execute(params![id, address, *source as i64, upsert.seen_at_ms])?;
    }
    conn.prepare_cached(
        "DELETE FROM peer_addresses WHERE node_id = ?1 AND address NOT IN (
             SELECT address FROM peer_addresses WHERE node_id = ?1
             ORDER BY last_success IS NULL, last_success DESC, consecutive_failures ASC, first_seen DESC, address
             LIMIT ?2)",
    )?
    .execute(params![id, MAX_ADDRESSES_PER_PEER])?;
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
) -> Result<((), Vec<PeerEvent>), StoreError> {
    let id = node_id.as_bytes().as_slice();
    let known = conn
        .prepare_cached("SELECT 1 FROM peers WHERE node_id = ?1")?
        .query_row([id], |_| Ok(()))
        .optional()?
        .is_some();
    if !known {
        return Ok(((), Vec::new()));
    }
    conn.prepare_cached("INSERT OR IGNORE INTO peer_quality (node_id) VALUES (?1)")?.execute([id])?;

    match &sample.outcome {
        Ok(rtt) => {
            if let Some(rtt) = rtt {
                let previous: Option<i64> = conn
                    .prepare_cached("SELECT rtt_ewma_us FROM peer_quality WHERE node_id = ?1")?
                    .query_row([id], |row| row.get(0))?;
                let ewma = next_rtt_ewma_us(previous, duration_to_micros(*rtt));
                conn.prepare_cached(
                    "UPDATE peer_quality SET rtt_ewma_us = ?2, rtt_samples = rtt_samples + 1 WHERE node_id = ?1",
                )?
                .execute(params![id, ewma])?;
            }
            // max(): samples may arrive out of order; the latest success is what matters.
            conn.prepare_cached(
                "UPDATE peer_quality SET successes = successes + 1,
                 last_success_at = max(coalesce(last_success_at, ?2), ?2) WHERE node_id = ?1",
            )?
            .execute(params![id, sample.at_ms])?;
            if let Some(address) = &sample.address {
                conn.prepare_cached(
                    "UPDATE peer_addresses SET last_success = max(coalesce(last_success, ?3), ?3),
                     consecutive_failures = 0 WHERE node_id = ?1 AND address = ?2",
                )?
                .execute(params![id, address, sample.at_ms])?;
            }
        }
        Err(message) => {
            let message = truncate_on_char_boundary(message, MAX_ERROR_BYTES);
            conn.prepare_cached(
                "UPDATE peer_quality SET failures = failures + 1, last_error = ?2, last_error_at = ?3
                 WHERE node_id = ?1",
            )?
            .execute(params![id, message, sample.at_ms])?;
            if let Some(address) = &sample.address {
                conn.prepare_cached(
                    "UPDATE peer_addresses SET last_failure = max(coalesce(last_failure, ?3), ?3),
                     consecutive_failures = consecutive_failures + 1 WHERE node_id = ?1 AND address = ?2",
                )?
                .execute(params![id, address, sample.at_ms])?;
            }
        }
    }

    let (successes, failures, rtt_us): (i64, i64, Option<i64>) = conn
        .prepare_cached("SELECT successes, failures, rtt_ewma_us FROM peer_quality WHERE node_id = ?1")?
        .query_row([id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    let score = score(
        codec::count_from_stored(successes),
        codec::count_from_stored(failures),
        rtt_us.map(duration_from_micros),
    );
    conn.prepare_cached("UPDATE peers SET score = ?2 WHERE node_id = ?1")?.execute(params![id, score])?;

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
            "DELETE FROM peers WHERE node_id IN (
                 SELECT node_id FROM peers ORDER BY last_seen ASC, node_id ASC LIMIT ?1)
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
