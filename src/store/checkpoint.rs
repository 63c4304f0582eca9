//! The checkpointer: a thread of its own (`store-checkpoint`) with its own connection that copies the WAL back
//! into the database file, so that the writer's commits do not wait for it.
//!
//! SQLite's default is an automatic checkpoint inside the COMMIT that crosses 1000 WAL pages: that copy and its
//! two fsyncs made up about a third of a writer busy with a burst of upserts, and every caller in that batch
//! waited for them. Here the checkpoint runs beside the writer (a PASSIVE checkpoint never blocks it, nor
//! readers): after [`CHECKPOINT_EVERY_WRITES`] committed writes, or [`CHECKPOINT_AFTER`] after the first write
//! not yet checkpointed, whichever comes first. The latter also bounds how long a commit stays only in the
//! WAL, which matters for power loss under `synchronous=NORMAL` (see `schema.rs`). The writer keeps SQLite's
//! automatic checkpoint at a higher threshold as a backstop, so the WAL stays bounded even if this thread
//! falls behind.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::StoreError;
use super::schema;
use super::writer::WriterStatus;

/// Committed writes after which the WAL is checkpointed: roughly SQLite's own threshold of 1000 pages, as a
/// write changes a few pages and a batch shares many of them.
const CHECKPOINT_EVERY_WRITES: u64 = 1000;
/// Longest a committed write waits for its checkpoint when writes are few.
const CHECKPOINT_AFTER: Duration = Duration::from_secs(10);

/// The writer's handle on the checkpoint thread.
pub(crate) struct Checkpointer {
    wake: SyncSender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    /// Opens the checkpoint connection and starts the thread. `status` is the writer's, whose committed-writes
    /// counter says how much is waiting in the WAL.
    pub(crate) fn start(path: &Path, status: Arc<WriterStatus>) -> Result<Checkpointer, StoreError> {
        let conn = schema::open_checkpoint_connection(path)?;
        // One slot: nudges while a checkpoint runs collapse into one.
        let (wake, nudges) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("store-checkpoint".to_owned())
            .spawn(move || run(conn, nudges, &status))
            .map_err(StoreError::CheckpointThread)?;
        Ok(Checkpointer { wake, thread })
    }

    /// Tells the thread that writes were committed. Never blocks: the writer calls it after every commit.
    pub(crate) fn nudge(&self) {
        // Full means a nudge is already pending; disconnected means the thread ended (and logged why).
        let _ = self.wake.try_send(());
    }

    /// Stops the thread after a last checkpoint of whatever is pending, and waits for it.
    pub(crate) fn stop(self) {
        drop(self.wake);
        if self.thread.join().is_err() {
            tracing::warn!(
                "the peer store checkpoint thread panicked; the WAL is checkpointed at the next open"
            );
        }
    }
}

fn run(conn: Connection, nudges: Receiver<()>, status: &WriterStatus) {
    let committed = || status.writes_committed.load(Ordering::Relaxed);
    let mut checkpointed = committed();
    // When the oldest write not yet checkpointed was noticed.
    let mut waiting_since: Option<Instant> = None;
    loop {
        let nudge = match waiting_since {
            None => nudges.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(since) => nudges.recv_timeout(CHECKPOINT_AFTER.saturating_sub(since.elapsed())),
        };
        let stopping = matches!(nudge, Err(RecvTimeoutError::Disconnected));
        let now_committed = committed();
        let pending = now_committed.saturating_sub(checkpointed);
        if pending > 0 && waiting_since.is_none() {
            waiting_since = Some(Instant::now());
        }
        let due = waiting_since.is_some_and(|since| since.elapsed() >= CHECKPOINT_AFTER);
        if pending > 0 && (stopping || due || pending >= CHECKPOINT_EVERY_WRITES) {
            checkpoint(&conn);
            checkpointed = now_committed;
            waiting_since = None;
        }
        if stopping {
            break;
        }
    }
    if let Err((_, error)) = conn.close() {
        tracing::warn!(%error, "closing the peer store's checkpoint connection failed");
    }
}

/// One PASSIVE checkpoint: copies what it can without waiting for the writer or readers. Whatever it leaves
/// behind is taken by the next one.
fn checkpoint(conn: &Connection) {
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
    });
    match result {
        Ok((busy, wal_pages, copied)) => {
            tracing::trace!(busy, wal_pages, copied, "checkpointed the peer store's WAL")
        }
        // Not fatal: the WAL keeps the commits, and the writer's automatic checkpoint is the backstop.
        Err(error) => tracing::warn!(%error, "checkpointing the peer store's WAL failed"),
    }
}
