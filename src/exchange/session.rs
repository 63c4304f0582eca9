//! One authenticated connection's metadata session.
//!
//! Every connection carries exactly one bidirectional stream, opened by the listener: it writes its `Hello` at
//! once (0.5-RTT data, before the dialer is authenticated), so the dialer holds the listener's verified record
//! one round trip after it started the handshake. The dialer answers with its own `Hello`. After that the stream
//! carries correlated requests in both directions (fresh record, ping, peer exchange), each answered with the
//! same `request_id` and bounded by a timeout.
//!
//! A frame that is too large or does not decode ends the session and closes its connection with
//! [`CloseCode::Protocol`]; other connections are not affected.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::table::{Arbitrable, Direction};
use super::{ExchangeError, StreamError};
use crate::api::names::NodeId;
use crate::wire::{self, FrameDecoder, pb};

/// Requests awaiting an answer on one session; more are refused rather than queued without bound.
const MAX_PENDING_REQUESTS: usize = 64;
/// Requests from the peer being answered at once on one session.
const MAX_REQUESTS_HANDLED: usize = 8;
/// Outgoing frames queued per session before senders wait.
const OUTGOING_QUEUE: usize = 64;
/// Bytes read from the stream at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Application close codes: what a peer learns when we close a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// The node is stopping.
    Shutdown = 0,
    /// Another connection with the same peer won (simultaneous dials).
    Duplicate = 1,
    /// A malformed or oversized frame, or messages out of order.
    Protocol = 2,
    /// The peer's record failed verification: wrong key, bad signature, replay, skew.
    Verification = 3,
    /// We dialed ourselves.
    SelfConnection = 4,
    /// The operator forgot the peer.
    Forgotten = 5,
    /// The peer did not complete the exchange in time.
    Timeout = 6,
    /// A dial-back we asked for arrived; the connection has served its purpose.
    DialBackReceived = 7,
}

impl CloseCode {
    pub fn close(self, connection: &quinn::Connection, reason: &str) {
        connection.close(VarInt::from_u32(self as u32), reason.as_bytes());
    }
}

/// Reads whole envelopes from a stream.
pub struct EnvelopeReader {
    recv: RecvStream,
    decoder: FrameDecoder,
}

impl EnvelopeReader {
    pub fn new(recv: RecvStream) -> Self {
        Self { recv, decoder: FrameDecoder::default() }
    }

    /// The next envelope; `None` when the peer finished the stream.
    pub async fn next(&mut self) -> Result<Option<pb::Envelope>, ExchangeError> {
        loop {
            if let Some(envelope) = self.decoder.next_frame().map_err(ExchangeError::Frame)? {
                return Ok(Some(envelope));
            }
            match self.recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                Ok(None) => return Ok(None),
                Err(e) => return Err(StreamError::read(e).into()),
            }
        }
    }
}

/// Writes one envelope as a frame.
pub async fn write_envelope(send: &mut SendStream, envelope: &pb::Envelope) -> Result<(), ExchangeError> {
    let frame = wire::encode_frame(envelope).map_err(ExchangeError::Frame)?;
    send.write_all(&frame).await.map_err(|e| StreamError::Write(e).into())
}

/// A live session, shared by the table, the dialer and control requests.
#[derive(Clone)]
pub struct SessionHandle {
    inner: Arc<SessionInner>,
}

struct SessionInner {
    id: u64,
    peer: NodeId,
    direction: Direction,
    path: super::ConnectionPath,
    connection: quinn::Connection,
    since_ms: i64,
    /// Boxed: a channel allocates its slots in blocks of 32 up front, and an idle session should not hold 32
    /// envelopes' worth (about 4.4 KiB) of them; 32 pointers are 256 bytes.
    outgoing: mpsc::Sender<Box<pb::Envelope>>,
    pending: std::sync::Mutex<HashMap<u64, oneshot::Sender<pb::envelope::Kind>>>,
    next_request: AtomicU64,
    /// The exchange's tracker: the session's loops and request handlers are joined at shutdown.
    tasks: TaskTracker,
}

impl Arbitrable for SessionHandle {
    fn direction(&self) -> Direction {
        self.inner.direction
    }

    fn is_closed(&self) -> bool {
        self.inner.connection.close_reason().is_some()
    }

    fn session_id(&self) -> u64 {
        self.inner.id
    }

    fn is_relayed(&self) -> bool {
        self.inner.path.is_relayed()
    }
}

/// Everything a running session needs from the rest of the exchange to answer requests.
pub trait RequestHandler: Send + Sync + 'static {
    fn handle(
        &self,
        peer: NodeId,
        request: pb::envelope::Kind,
    ) -> impl Future<Output = Option<pb::envelope::Kind>> + Send;
}

/// What a session is made of once the `Hello`s are exchanged.
pub struct SessionParts {
    pub id: u64,
    pub peer: NodeId,
    pub direction: Direction,
    pub path: super::ConnectionPath,
    pub connection: quinn::Connection,
    pub send: SendStream,
    pub reader: EnvelopeReader,
    pub since_ms: i64,
}

impl SessionHandle {
    /// Starts the reader and writer tasks of an exchanged stream. `on_end` runs once when the session ends.
    pub fn start<H: RequestHandler>(
        parts: SessionParts,
        handler: Arc<H>,
        tasks: &TaskTracker,
        on_end: impl FnOnce(&SessionHandle, Option<ExchangeError>) + Send + 'static,
    ) -> Self {
        let SessionParts { id, peer, direction, path, connection, send, reader, since_ms } = parts;
        let (outgoing, queue) = mpsc::channel(OUTGOING_QUEUE);
        let handle = Self {
            inner: Arc::new(SessionInner {
                id,
                peer,
                direction,
                path,
                connection,
                since_ms,
                outgoing,
                pending: std::sync::Mutex::new(HashMap::new()),
                next_request: AtomicU64::new(1),
                tasks: tasks.clone(),
            }),
        };
        tasks.spawn(write_loop(send, queue));
        let session = handle.clone();
        tasks.spawn(async move {
            let result = session.read_loop(reader, handler).await;
            let error = result.err();
            match &error {
                Some(ExchangeError::Frame(e)) => {
                    tracing::warn!(peer = %session.inner.peer, error = %e, "closing a session after a bad frame");
                    CloseCode::Protocol.close(&session.inner.connection, "bad frame");
                }
                Some(e) => tracing::debug!(peer = %session.inner.peer, error = %e, "session ended"),
                None => tracing::debug!(peer = %session.inner.peer, "peer finished the session"),
            }
            if session.inner.connection.close_reason().is_none() {
                CloseCode::Protocol.close(&session.inner.connection, "session stream ended");
            }
            // Wake every request still waiting: their answers will not come.
            session.pending().clear();
            on_end(&session, error);
        });
        handle
    }

    pub fn id(&self) -> u64 {
        self.inner.id
    }

    pub fn peer(&self) -> NodeId {
        self.inner.peer
    }

    pub fn direction(&self) -> Direction {
        self.inner.direction
    }

    pub fn path(&self) -> super::ConnectionPath {
        self.inner.path
    }

    pub fn connection(&self) -> &quinn::Connection {
        &self.inner.connection
    }

    pub fn since_ms(&self) -> i64 {
        self.inner.since_ms
    }

    pub fn close(&self, code: CloseCode, reason: &str) {
        code.close(&self.inner.connection, reason);
    }

    /// Sends a request and waits for the answer with the same `request_id`, at most `timeout`.
    /// Returns the answer and its round trip.
    pub async fn request(
        &self,
        request: pb::envelope::Kind,
        timeout: Duration,
    ) -> Result<(pb::envelope::Kind, Duration), ExchangeError> {
        let request_id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut pending = self.pending();
            if pending.len() >= MAX_PENDING_REQUESTS {
                return Err(ExchangeError::Busy);
            }
            pending.insert(request_id, reply);
        }
        let started = Instant::now();
        let envelope = Box::new(pb::Envelope { request_id, kind: Some(request) });
        if self.inner.outgoing.send(envelope).await.is_err() {
            self.pending().remove(&request_id);
            return Err(ExchangeError::SessionClosed);
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(pb::envelope::Kind::Error(e))) => Err(ExchangeError::refused(e.message)),
            Ok(Ok(kind)) => Ok((kind, started.elapsed())),
            Ok(Err(_)) => Err(ExchangeError::SessionClosed),
            Err(_) => {
                self.pending().remove(&request_id);
                Err(ExchangeError::TimedOut("the peer did not answer"))
            }
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<pb::envelope::Kind>>> {
        // Each operation is one insert or remove: the map is consistent even after a holder panicked.
        self.inner.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn read_loop<H: RequestHandler>(
        &self,
        mut reader: EnvelopeReader,
        handler: Arc<H>,
    ) -> Result<(), ExchangeError> {
        let handling = Arc::new(tokio::sync::Semaphore::new(MAX_REQUESTS_HANDLED));
        while let Some(envelope) = reader.next().await? {
            let Some(kind) = envelope.kind else {
                return Err(ExchangeError::Frame(wire::FrameError::Malformed(
                    "envelope without a message".into(),
                )));
            };
            if is_response(&kind) {
                // An answer nobody waits for (timed out) is dropped; an unknown id is harmless too.
                if let Some(reply) = self.pending().remove(&envelope.request_id) {
                    let _ = reply.send(kind);
                }
                continue;
            }
            if matches!(kind, pb::envelope::Kind::Hello(_)) || envelope.request_id == 0 {
                return Err(ExchangeError::Frame(wire::FrameError::Malformed(
                    "a request needs a nonzero request_id, and Hello is sent once".into(),
                )));
            }
            // Requests are answered concurrently: some wait on other sessions (a rendezvous waits for the
            // target's answer to an introduction), and two such waits on one reader would deadlock two
            // sessions that wait on each other. The permit bounds the work one peer can start; while it is
            // used up, this loop stops reading, which pushes back on the peer through QUIC flow control.
            let permit = handling.clone().acquire_owned().await.map_err(|_| ExchangeError::SessionClosed)?;
            let (handler, outgoing, peer) = (handler.clone(), self.inner.outgoing.clone(), self.inner.peer);
            let request_id = envelope.request_id;
            self.inner.tasks.spawn(async move {
                let _permit = permit;
                let answer = handler.handle(peer, kind).await.unwrap_or_else(|| {
                    pb::envelope::Kind::Error(pb::ErrorResponse {
                        code: 1,
                        message: "unsupported request".into(),
                    })
                });
                // A closed session has nobody to answer.
                let _ = outgoing.send(Box::new(pb::Envelope { request_id, kind: Some(answer) })).await;
            });
        }
        Ok(())
    }
}

fn is_response(kind: &pb::envelope::Kind) -> bool {
    use pb::envelope::Kind;
    matches!(
        kind,
        Kind::GetRecordResponse(_)
            | Kind::Pong(_)
            | Kind::PeerExchangeResponse(_)
            | Kind::DialBackResponse(_)
            | Kind::PunchResponse(_)
            | Kind::RelayReservationResponse(_)
            | Kind::CircuitResponse(_)
            | Kind::RecordUpdateAck(_)
            | Kind::Error(_)
    )
}

async fn write_loop(mut send: SendStream, mut queue: mpsc::Receiver<Box<pb::Envelope>>) {
    while let Some(envelope) = queue.recv().await {
        if let Err(e) = write_envelope(&mut send, &envelope).await {
            tracing::debug!(error = %e, "session writer stopped");
            return;
        }
    }
    let _ = send.finish();
}
