//! Lets gRPC clients that name the control socket by its path reach the API.
//!
//! Over a Unix socket, some clients (grpcurl up to 1.8, grpc-java) send the socket's path as the HTTP/2
//! `:authority`. The HTTP/2 server under tonic rejects such a request as malformed and resets the stream with
//! PROTOCOL_ERROR (hyperium/h2#487), so `grpcurl -unix /run/remote-network/control.sock list` would fail. The
//! authority means nothing on a Unix socket, so each accepted connection passes through this shim:
//!
//! - The first request's header block is decoded. If its `:authority` is valid (or absent), as with tonic, Go
//!   gRPC and Python clients, the connection is passed through byte for byte from then on.
//! - Otherwise every header block the client sends on that connection is decoded and re-encoded with the
//!   authority replaced by `localhost`. Re-encoded fields are literals that the server does not index, so the
//!   server's HPACK table stays empty and can never disagree with the client's.
//!
//! Only the client-to-server direction is inspected; responses are copied unchanged.

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

use crate::limits::ServerLimits;
use crate::sync::{Throttle, lock};
use tonic::codegen::http::uri::Authority;

/// The client connection preface of HTTP/2 (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Frames we write stay within the smallest SETTINGS_MAX_FRAME_SIZE a server may announce. It is also the
/// largest a client may send: the server announces no SETTINGS_MAX_FRAME_SIZE of its own, so the protocol's
/// 16 KiB holds (RFC 9113 §4.2), and a larger frame is one it would refuse anyway.
const MAX_FRAME: usize = 16_384;
/// Largest frame the protocol can carry: what the server may send to a client that announced it takes it.
const MAX_FRAME_ANY: usize = (1 << 24) - 1;
/// A client's header block beyond this closes the connection (the server's own limit is far lower).
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Largest decoded header list the shim re-encodes: four times what the HTTP/2 server accepts (hyper's
/// default, 16 KiB), so nothing the server would take is refused here.
const MAX_HEADER_LIST: usize = 64 * 1024;
/// The HPACK table size the server announces (the protocol default, which tonic keeps).
const HPACK_TABLE_SIZE: usize = 4096;
/// What a frame's buffer holds before its payload arrives; it grows from there as bytes come in.
const FIRST_READ: usize = 1024;
/// Buffer between the shim and the HTTP/2 server.
const PIPE_BUFFER: usize = 64 * 1024;

/// Wraps an accepted connection; the returned stream goes to the HTTP/2 server. Without a free slot in `limits`
/// the client is disconnected at once (the server sees a connection that ends before its preface), so that idle
/// or stalled clients cannot take every file descriptor the daemon (and its database) needs. A connection with
/// no call in progress for the idle timeout is closed; one that holds a call open (a watch) is not.
pub fn wrap<S>(client: S, limits: &Arc<ServerLimits>) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (server_side, shim_side) = tokio::io::duplex(PIPE_BUFFER);
    let Some(slot) = limits.try_open() else {
        log_refused(limits.settings().max_connections);
        return server_side;
    };
    tokio::spawn(async move {
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut server_read, mut server_write) = tokio::io::split(shim_side);
        let calls = Calls::new();
        let handshake = slot.limits().handshake_timeout();
        // When either direction ends the connection is over: dropping both halves closes both sides.
        tokio::select! {
            result = forward_requests(&mut client_read, &mut server_write, handshake, &calls) => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "control connection closed while reading the client");
                }
            }
            _ = forward_responses(&mut server_read, &mut client_write, &calls) => {}
            () = calls.idle(slot.limits()) => {
                tracing::debug!("control connection closed: idle");
            }
        }
        drop(slot);
        let _ = client_write.shutdown().await;
    });
    server_side
}

/// Logs refused connections at WARN, at most once per [`REFUSAL_WARN_INTERVAL`] with the count since.
fn log_refused(limit: usize) {
    static REFUSALS: Throttle = Throttle::new(REFUSAL_WARN_INTERVAL);
    if let Some(refused) = REFUSALS.event() {
        tracing::warn!(
            refused,
            limit,
            "control connections refused: too many are open (control.max_connections); close idle clients"
        );
    }
}

const REFUSAL_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The calls (HTTP/2 streams) open on one connection, as seen from its frames: opened by a client's HEADERS,
/// ended by the server's END_STREAM or by a reset from either side.
#[derive(Debug)]
struct Calls(Mutex<CallState>);

#[derive(Debug)]
struct CallState {
    open: HashSet<u32>,
    /// Since when no call has been open.
    idle_since: Option<Instant>,
}

impl Calls {
    fn new() -> Self {
        Self(Mutex::new(CallState { open: HashSet::new(), idle_since: Some(Instant::now()) }))
    }

    fn opened(&self, stream: u32) {
        let mut state = lock(&self.0);
        // A client that opens more streams than the server allows has them refused (and reset) by the server;
        // the set is bounded by the same limit in practice, and by the connection's life in any case.
        state.open.insert(stream);
        state.idle_since = None;
    }

    fn ended(&self, stream: u32) {
        let mut state = lock(&self.0);
        if state.open.remove(&stream) && state.open.is_empty() {
            state.idle_since = Some(Instant::now());
        }
    }

    /// Resolves once no call has been open for the idle timeout of `limits` (read at each check, so a reload
    /// applies).
    async fn idle(&self, limits: &ServerLimits) {
        loop {
            let timeout = limits.idle_timeout();
            let since = lock(&self.0).idle_since;
            match since {
                Some(since) if since.elapsed() >= timeout => return,
                Some(since) => tokio::time::sleep_until((since + timeout).into()).await,
                None => tokio::time::sleep(timeout).await,
            }
        }
    }

    /// Notes what a frame does to the calls: `from_client` tells the direction.
    fn track(&self, frame: &Frame, from_client: bool) {
        match frame.kind {
            FRAME_HEADERS if from_client && frame.stream != 0 => self.opened(frame.stream),
            FRAME_RST_STREAM => self.ended(frame.stream),
            FRAME_HEADERS | FRAME_DATA if !from_client && frame.flags & FLAG_END_STREAM != 0 => {
                self.ended(frame.stream)
            }
            _ => {}
        }
    }
}

/// What the first request of a connection decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Undecided,
    Rewrite,
    /// Every frame passes unchanged.
    PassThrough,
}

/// Copies the server's frames to the client unchanged, noting the calls they end.
async fn forward_responses<R, W>(server: &mut R, client: &mut W, calls: &Calls) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while let Some(frame) = read_frame(server, MAX_FRAME_ANY).await? {
        calls.track(&frame, false);
        client.write_all(&frame.raw).await?;
    }
    client.shutdown().await
}

/// Copies the client's HTTP/2 stream to the server, fixing `:authority` where needed, noting the calls opened.
/// The preface and the first request's headers must arrive within `handshake`.
async fn forward_requests<R, W>(
    client: &mut R,
    server: &mut W,
    handshake: Duration,
    calls: &Calls,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE.len()];
    let deadline = tokio::time::Instant::now() + handshake;
    tokio::time::timeout_at(deadline, client.read_exact(&mut preface)).await.map_err(too_slow)??;
    server.write_all(&preface).await?;
    if &preface != PREFACE {
        // Not HTTP/2 with prior knowledge: the server will answer it as it sees fit.
        return pass_through(client, server).await;
    }
    let mut decoder = Decoder::new();
    decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
    let mut mode = Mode::Undecided;
    loop {
        let Some(first) = read_in_mode(client, mode, deadline).await? else { return server.shutdown().await };
        calls.track(&first, true);
        if first.kind != FRAME_HEADERS || mode == Mode::PassThrough {
            server.write_all(&first.raw).await?;
            continue;
        }
        let (frames, block) = read_header_block(client, first, mode, deadline, calls).await?;
        let headers = block.and_then(|block| decode_bounded(&mut decoder, &block));
        let Some(mut headers) = headers else {
            for frame in &frames {
                server.write_all(&frame.raw).await?;
            }
            mode = Mode::PassThrough;
            continue;
        };
        if mode == Mode::Undecided {
            let needs_fix =
                headers.iter().any(|(name, value)| name == b":authority" && !valid_authority(value));
            if !needs_fix {
                for frame in &frames {
                    server.write_all(&frame.raw).await?;
                }
                mode = Mode::PassThrough;
                continue;
            }
            tracing::debug!("control client sent a socket path as :authority; rewriting it to localhost");
            mode = Mode::Rewrite;
        }
        for (name, value) in &mut headers {
            if name == b":authority" && !valid_authority(value) {
                *value = b"localhost".to_vec();
            }
        }
        let end_stream = frames[0].flags & FLAG_END_STREAM;
        server.write_all(&header_frames(frames[0].stream, end_stream, &encode_block(&headers))).await?;
    }
}

fn too_slow<E>(_: E) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "no HTTP/2 preface and request headers in time")
}

/// The client's next frame. Until the first request decided the mode, the client has the handshake deadline;
/// after that, the connection is the server's (its own keep-alive and stream limits apply).
async fn read_in_mode<R: AsyncRead + Unpin>(
    client: &mut R,
    mode: Mode,
    deadline: tokio::time::Instant,
) -> io::Result<Option<Frame>> {
    match mode {
        Mode::Undecided => {
            tokio::time::timeout_at(deadline, read_frame(client, MAX_FRAME)).await.map_err(too_slow)?
        }
        Mode::Rewrite | Mode::PassThrough => read_frame(client, MAX_FRAME).await,
    }
}

/// Gathers a whole header block: the HEADERS frame `first`, then CONTINUATION frames of the same stream.
/// Returns the frames as read, and the block when it is complete (`None` when the client broke the sequence,
/// which the server must see exactly as sent to report it).
async fn read_header_block<R: AsyncRead + Unpin>(
    client: &mut R,
    first: Frame,
    mode: Mode,
    deadline: tokio::time::Instant,
    calls: &Calls,
) -> io::Result<(Vec<Frame>, Option<Vec<u8>>)> {
    let stream = first.stream;
    let mut frames = vec![first];
    let mut block = Vec::new();
    loop {
        let frame = frames.last().expect("at least the HEADERS frame");
        let Some(fragment) = frame.fragment() else { return Ok((frames, None)) };
        block.extend_from_slice(fragment);
        if frame.flags & FLAG_END_HEADERS != 0 {
            return Ok((frames, Some(block)));
        }
        if block.len() > MAX_HEADER_BLOCK {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "header block too large"));
        }
        match read_in_mode(client, mode, deadline).await? {
            Some(next) if next.kind == FRAME_CONTINUATION && next.stream == stream => frames.push(next),
            Some(other) => {
                calls.track(&other, true);
                frames.push(other);
                return Ok((frames, None));
            }
            None => return Ok((frames, None)),
        }
    }
}

async fn pass_through<R, W>(client: &mut R, server: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::io::copy(client, server).await?;
    server.shutdown().await
}

/// Decodes a header block, or `None` if it does not decode or its header list is larger than
/// [`MAX_HEADER_LIST`] (counted as RFC 7541 section 4.1 does: name, value and 32 bytes per field). HPACK lets
/// a one-byte index stand for a 4 KiB table entry, so a 256 KiB block could otherwise decode to a gigabyte.
fn decode_bounded(decoder: &mut Decoder<'_>, block: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut headers = Vec::new();
    let mut size = 0usize;
    decoder
        .decode_with_cb(block, |name, value| {
            size = size.saturating_add(name.len() + value.len() + 32);
            if size <= MAX_HEADER_LIST {
                headers.push((name.into_owned(), value.into_owned()));
            }
        })
        .ok()?;
    (size <= MAX_HEADER_LIST).then_some(headers)
}

fn valid_authority(value: &[u8]) -> bool {
    Authority::try_from(value).is_ok()
}

/// One HTTP/2 frame as read: its raw bytes plus the fields this shim looks at.
struct Frame {
    raw: Vec<u8>,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Frame {
    /// The header block fragment of a HEADERS or CONTINUATION frame, without padding and priority fields;
    /// `None` if the frame's own lengths are inconsistent.
    fn fragment(&self) -> Option<&[u8]> {
        let mut payload = &self.raw[9..];
        if self.kind != FRAME_HEADERS {
            return Some(payload);
        }
        let mut padding = 0;
        if self.flags & FLAG_PADDED != 0 {
            let (&pad, rest) = payload.split_first()?;
            padding = usize::from(pad);
            payload = rest;
        }
        if self.flags & FLAG_PRIORITY != 0 {
            payload = payload.get(5..)?;
        }
        payload.get(..payload.len().checked_sub(padding)?)
    }
}

/// Reads one frame; `None` at a clean end of stream between frames.
async fn read_frame<R: AsyncRead + Unpin>(client: &mut R, max_len: usize) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 9];
    match client.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    if len > max_len {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame larger than the server allows"));
    }
    // The buffer grows with the bytes that arrive, never to what the header merely announces: thousands of
    // connections each announcing a large frame and sending nothing more must cost nothing.
    let mut raw = Vec::with_capacity(9 + len.min(FIRST_READ));
    raw.extend_from_slice(&head);
    let read = (&mut *client).take(len as u64).read_to_end(&mut raw).await?;
    if read < len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a frame"));
    }
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Ok(Some(Frame { raw, kind: head[3], flags: head[4], stream }))
}

/// HPACK-encodes headers as literals without indexing, with literal names and no Huffman coding
/// (RFC 7541, section 6.2.2): the receiver's dynamic table is never touched.
fn encode_block(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        encode_string(name, &mut out);
        encode_string(value, &mut out);
    }
    out
}

fn encode_string(bytes: &[u8], out: &mut Vec<u8>) {
    encode_integer(bytes.len(), 7, 0x00, out);
    out.extend_from_slice(bytes);
}

/// An HPACK integer with an N-bit prefix (RFC 7541, section 5.1).
fn encode_integer(value: usize, prefix_bits: u32, first_byte: u8, out: &mut Vec<u8>) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(first_byte | value as u8);
        return;
    }
    out.push(first_byte | max_prefix as u8);
    let mut rest = value - max_prefix;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// A header block as a HEADERS frame followed by as many CONTINUATION frames as its size needs.
fn header_frames(stream: u32, end_stream: u8, block: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(block.len() + 9 * (block.len() / MAX_FRAME + 1));
    let chunks: Vec<&[u8]> = if block.is_empty() { vec![&[][..]] } else { block.chunks(MAX_FRAME).collect() };
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let (kind, mut flags) = if i == 0 { (FRAME_HEADERS, end_stream) } else { (FRAME_CONTINUATION, 0) };
        if i == last {
            flags |= FLAG_END_HEADERS;
        }
        let len = chunk.len().to_be_bytes();
        out.extend_from_slice(&len[len.len() - 3..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// Runs `client_bytes` through the shim as one connection's client-to-server bytes, all arrived, into a buffer
/// standing in for the server. For the fuzz target (`tests/fuzz`) and the randomised tests.
///
/// # Panics
///
/// Only if the shim changes bytes it promises to pass through: anything before a valid preface, or a connection
/// whose first request needs no rewriting, must reach the server exactly as sent.
pub fn fuzz_forward_requests(client_bytes: &[u8]) {
    let mut server = Vec::new();
    let mut client = client_bytes;
    let calls = Calls::new();
    let forwarded = crate::sync::block_on_local(forward_requests(
        &mut client,
        &mut server,
        Duration::from_secs(10),
        &calls,
    ));
    std::hint::black_box(forwarded.and_then(Result::err));
    if client_bytes.len() >= PREFACE.len() && !client_bytes.starts_with(PREFACE) {
        assert_eq!(server, client_bytes, "bytes that are not HTTP/2 were not passed through unchanged");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `:authority` as a literal with incremental indexing (name: static index 1), as Go clients send it.
    fn indexed_authority(value: &[u8]) -> Vec<u8> {
        let mut out = vec![0x41];
        encode_string(value, &mut out);
        out
    }

    fn request(stream: u32, block: &[u8]) -> Vec<u8> {
        header_frames(stream, FLAG_END_STREAM, block)
    }

    /// A reader that hands out only what it was given and counts how much buffer it was offered: a frame
    /// header announcing a large payload must not make the shim allocate for it before the bytes arrive.
    struct Trickle {
        data: Vec<u8>,
        offered: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            self.offered = self.offered.max(buf.remaining());
            let n = buf.remaining().min(self.data.len());
            let rest = self.data.split_off(n);
            buf.put_slice(&self.data);
            self.data = rest;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_frame_header_alone_costs_no_payload_buffer() {
        // A HEADERS frame header announcing the largest frame, then three bytes and the end of the stream.
        let mut data = vec![0x00, 0x40, 0x00, FRAME_HEADERS, 0, 0, 0, 0, 1];
        data.extend_from_slice(b"abc");
        let mut client = Trickle { data, offered: 0 };
        let error = read_frame(&mut client, MAX_FRAME).await.err().expect("the frame never completes");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        assert!(client.offered <= FIRST_READ + 9, "offered {} bytes of buffer", client.offered);

        // Beyond the protocol's frame size: refused from the header alone.
        let mut client = &[0x04u8, 0x00, 0x00, FRAME_HEADERS, 0, 0, 0, 0, 1][..];
        let error = read_frame(&mut client, MAX_FRAME).await.err().expect("too large");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    async fn run(input: Vec<u8>) -> Vec<u8> {
        let mut client = &input[..];
        let mut server = Vec::new();
        forward_requests(&mut client, &mut server, Duration::from_secs(10), &Calls::new())
            .await
            .expect("forward");
        server
    }

    /// Decodes every header block of the server's input with one decoder, as the server would.
    fn server_view(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        assert_eq!(&bytes[..24], PREFACE);
        let mut decoder = Decoder::new();
        let mut rest = &bytes[24..];
        let mut blocks = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            if rest[3] == FRAME_HEADERS {
                blocks.push(decoder.decode(&rest[9..9 + len]).expect("server decodes"));
            }
            rest = &rest[9 + len..];
        }
        blocks
    }

    #[tokio::test]
    async fn a_header_block_that_decodes_past_the_list_limit_is_not_rewritten() {
        // One 4000-byte table entry, then 4000 one-byte references to it: 4 KB of block, 16 MB decoded.
        let mut block = vec![0x40];
        encode_string(b"x-big", &mut block);
        encode_string(&[b'v'; 4000], &mut block);
        block.extend(std::iter::repeat_n(0xbe, 4000)); // indexed: dynamic entry 62
        assert!(decode_bounded(&mut Decoder::new(), &block).is_none());
        let mut input = PREFACE.to_vec();
        input.extend(request(1, &block));
        // Passed on as sent, for the server to refuse by its own limit; nothing was decoded into memory.
        assert_eq!(run(input.clone()).await, input);
    }

    #[test]
    fn the_fuzz_entry_passes_through_what_is_not_http2() {
        fuzz_forward_requests(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut input = PREFACE.to_vec();
        input.extend(request(1, &indexed_authority(b"/run/remote-network/control.sock")));
        for cut in 0..=input.len() {
            fuzz_forward_requests(&input[..cut]);
        }
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_on_every_request() {
        let mut input = PREFACE.to_vec();
        // A SETTINGS frame passes through untouched.
        input.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        let mut first = vec![0x83]; // :method POST
        first.extend(indexed_authority(b"/run/remote-network/control.sock"));
        input.extend(request(1, &first));
        // The second request refers to the authority by its dynamic table index (62).
        input.extend(request(3, &[0x83, 0xbe]));
        let output = run(input).await;
        assert_eq!(&output[24..33], &[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        let blocks = server_view(&output);
        assert_eq!(blocks.len(), 2);
        for block in blocks {
            assert!(block.contains(&(b":authority".to_vec(), b"localhost".to_vec())), "{block:?}");
            assert!(block.contains(&(b":method".to_vec(), b"POST".to_vec())));
        }
    }

    #[tokio::test]
    async fn a_valid_authority_passes_through_byte_for_byte() {
        let mut input = PREFACE.to_vec();
        let mut block = vec![0x83];
        block.extend(indexed_authority(b"localhost"));
        input.extend(request(1, &block));
        input.extend(request(3, &[0x83, 0xbe]));
        // Later frames of any kind are copied as they are: a DATA frame and a PING.
        input.extend_from_slice(&[0, 0, 5, FRAME_DATA, FLAG_END_STREAM, 0, 0, 0, 3, 0, 0, 0, 0, 0]);
        input.extend_from_slice(&[0, 0, 8, 0x6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(run(input.clone()).await, input);
    }

    #[tokio::test]
    async fn large_blocks_are_split_into_continuation_frames() {
        let headers =
            vec![(b":authority".to_vec(), b"localhost".to_vec()), (b"x-big".to_vec(), vec![b'a'; 40_000])];
        let frames = header_frames(5, 0, &encode_block(&headers));
        let mut rest = &frames[..];
        let mut block = Vec::new();
        let mut kinds = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            assert!(len <= MAX_FRAME);
            kinds.push((rest[3], rest[4] & FLAG_END_HEADERS != 0));
            block.extend_from_slice(&rest[9..9 + len]);
            rest = &rest[9 + len..];
        }
        assert_eq!(kinds, [(FRAME_HEADERS, false), (FRAME_CONTINUATION, false), (FRAME_CONTINUATION, true)]);
        assert_eq!(Decoder::new().decode(&block).expect("decode"), headers);
    }

    #[test]
    fn integers_use_continuation_bytes_beyond_the_prefix() {
        // RFC 7541, C.1.2: 1337 with a 5-bit prefix.
        let mut out = Vec::new();
        encode_integer(1337, 5, 0, &mut out);
        assert_eq!(out, [31, 154, 10]);
    }
}
