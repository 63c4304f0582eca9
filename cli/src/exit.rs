//! How rnctl ends: the exit statuses scripts can rely on, and [`Failure`], the one error type commands return,
//! which knows both its exit status and the single line it prints to stderr.

use std::error::Error as _;
use std::fmt::Write as _;
use std::io;
use std::process::ExitCode;

use tonic::Code;

/// The exit statuses of rnctl. Part of its interface: keep in step with [`EXIT_STATUS_HELP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    /// Anything not covered below, such as failing to write the output.
    Failure = 1,
    /// Bad command line or bad local input. Also what clap exits with on its own usage errors.
    Usage = 2,
    /// No daemon could be reached, or the connection to it broke.
    Connect = 3,
    /// The daemon answered with an error, or did not answer within `--timeout`.
    Daemon = 4,
    /// The daemon does not know the peer asked about.
    NotFound = 5,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

/// Shown at the end of `rnctl --help`.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  success
  1  unexpected failure (e.g. output could not be written)
  2  usage error or invalid input, refused before anything is sent (malformed node id, topic, address,
     duration, URL...)
  3  could not connect to the daemon, or the connection to it broke
  4  the daemon answered with an error (printed as 'rnctl: <grpc code>: <message>'), or did not answer
     within --timeout
  5  not found: unknown peer (peers show, peers forget, peers query, connect NODE_ID)";

/// Why a command did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// Input rejected before anything was sent; the message says which rule was broken.
    Usage(String),
    /// The daemon could not be reached; the message says where rnctl looked.
    Connect(String),
    /// The daemon (or the transport on its behalf) answered a call with an error status.
    Status(tonic::Status),
    /// A successful answer that means "no such thing", such as forgetting an unknown peer.
    NotFound(String),
    /// Standard output was closed early, e.g. by `| head`: stop quietly, there is no one left to tell.
    OutputClosed,
    Other(anyhow::Error),
}

impl Failure {
    pub fn exit(&self) -> Exit {
        match self {
            Self::Usage(_) => Exit::Usage,
            Self::Connect(_) => Exit::Connect,
            // tonic keeps the underlying error as the source of a status it made itself from a failed
            // connection; a status the daemon sent is decoded from its headers and has none. Telling the two
            // apart by code alone would make the daemon's own UNAVAILABLE (a peer it could not reach, a full
            // disk) read as "rnctl could not reach the daemon".
            Self::Status(status) if status.source().is_some() => Exit::Connect,
            Self::Status(status) => exit_for_code(status.code()),
            Self::NotFound(_) => Exit::NotFound,
            Self::OutputClosed => Exit::Success,
            Self::Other(_) => Exit::Failure,
        }
    }

    /// The line to print on stderr (without the `rnctl: ` prefix), if any.
    pub fn message(&self) -> Option<String> {
        match self {
            Self::Usage(message) | Self::Connect(message) => Some(message.clone()),
            Self::Status(status) => Some(describe_status(status)),
            Self::NotFound(message) => Some(format!("{}: {message}", code_name(Code::NotFound))),
            Self::OutputClosed => None,
            Self::Other(error) => Some(format!("{error:#}")),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        Self::Status(status)
    }
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Self {
        if error.kind() == io::ErrorKind::BrokenPipe {
            Self::OutputClosed
        } else {
            Self::Other(anyhow::Error::new(error).context("cannot write output"))
        }
    }
}

/// The exit status for a gRPC status code the daemon answered with.
pub fn exit_for_code(code: Code) -> Exit {
    match code {
        Code::Ok => Exit::Success,
        Code::NotFound => Exit::NotFound,
        _ => Exit::Daemon,
    }
}

/// The gRPC name of a code in lowercase words, as printed in error lines: `invalid argument`, `not found`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// `<code name>: <message>`, plus the underlying cause when tonic made the status from a transport error (whose
/// own message, like "transport error", says little).
fn describe_status(status: &tonic::Status) -> String {
    let mut line = code_name(status.code()).to_owned();
    if !status.message().is_empty() {
        let _ = write!(line, ": {}", status.message());
    }
    let mut cause = status.source();
    while let Some(error) = cause {
        let text = error.to_string();
        if !line.contains(&text) {
            let _ = write!(line, ": {text}");
        }
        cause = error.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_grpc_codes_to_exit_statuses() {
        assert_eq!(exit_for_code(Code::NotFound), Exit::NotFound);
        for code in [
            Code::Unavailable,
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::Unimplemented,
            Code::FailedPrecondition,
            Code::Unknown,
        ] {
            assert_eq!(exit_for_code(code), Exit::Daemon, "{code:?}");
        }
    }

    #[test]
    fn exit_statuses_have_their_documented_numbers() {
        let numbers = [
            (Exit::Success, 0),
            (Exit::Failure, 1),
            (Exit::Usage, 2),
            (Exit::Connect, 3),
            (Exit::Daemon, 4),
            (Exit::NotFound, 5),
        ];
        for (exit, number) in numbers {
            assert_eq!(exit as u8, number);
            assert!(EXIT_STATUS_HELP.contains(&format!("  {number}  ")), "{exit:?} is not documented");
        }
    }

    #[test]
    fn status_lines_name_the_code_then_the_message() {
        let status = tonic::Status::invalid_argument("topic: a topic is 1-255 bytes");
        let failure = Failure::from(status);
        assert_eq!(failure.exit(), Exit::Daemon);
        assert_eq!(failure.message().as_deref(), Some("invalid argument: topic: a topic is 1-255 bytes"));
        let bare = Failure::from(tonic::Status::unauthenticated(""));
        assert_eq!(bare.message().as_deref(), Some("unauthenticated"));
    }

    #[test]
    fn a_broken_connection_is_not_an_answer() {
        let broken = tonic::Status::from_error(Box::new(io::Error::other("connection reset")));
        assert!(broken.source().is_some());
        assert_eq!(Failure::from(broken).exit(), Exit::Connect);
        let answered = tonic::Status::unavailable("connecting to 192.0.2.1:1: QUIC handshake failed");
        assert_eq!(Failure::from(answered).exit(), Exit::Daemon);
    }

    #[test]
    fn broken_pipe_ends_quietly() {
        let failure = Failure::from(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(failure.exit(), Exit::Success);
        assert_eq!(failure.message(), None);
        assert_eq!(Failure::from(io::Error::other("disk full")).exit(), Exit::Failure);
    }
}
