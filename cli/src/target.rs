//! Finding the daemon: an explicit `--socket` or `--endpoint` (from the command line or the environment), or
//! else the first control socket that exists among the places the daemon puts it. Also words the single line
//! printed when no daemon can be reached.

use std::error::Error as _;
use std::ffi::OsStr;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use remote_network::api::client::{self, Target};
use tonic::transport::Channel;

use crate::exit::Failure;

/// Where a setting came from. A command-line flag beats an environment variable, so a shell that exports
/// `RNCTL_SOCKET` can still point one command at `--endpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Env,
}

/// Where to connect, before looking at the file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Socket(PathBuf),
    Endpoint(String),
    /// Neither was given: look for the socket in the usual places.
    Discover,
}

/// Picks between `--socket` and `--endpoint`. Empty values count as unset, so `RNCTL_SOCKET=` clears it.
///
/// Both at the same level (two flags, or two environment variables) is ambiguous and refused; a flag of one
/// kind overrides an environment variable of the other.
pub fn choose(
    socket: Option<(PathBuf, Origin)>,
    endpoint: Option<(String, Origin)>,
) -> Result<Choice, Failure> {
    let socket = socket.filter(|(path, _)| !path.as_os_str().is_empty());
    let endpoint = endpoint.filter(|(url, _)| !url.is_empty());
    match (socket, endpoint) {
        (None, None) => Ok(Choice::Discover),
        (Some((path, _)), None) => Ok(Choice::Socket(path)),
        (None, Some((url, _))) => Ok(Choice::Endpoint(url)),
        (Some((path, Origin::Flag)), Some((_, Origin::Env))) => Ok(Choice::Socket(path)),
        (Some((_, Origin::Env)), Some((url, Origin::Flag))) => Ok(Choice::Endpoint(url)),
        (Some((_, Origin::Flag)), Some((_, Origin::Flag))) => Err(Failure::Usage(
            "--socket and --endpoint cannot be used together: pick one way to reach the daemon".to_owned(),
        )),
        (Some((_, Origin::Env)), Some((_, Origin::Env))) => Err(Failure::Usage(
            "RNCTL_SOCKET and RNCTL_ENDPOINT are both set: unset one, or pass --socket or --endpoint"
                .to_owned(),
        )),
    }
}

/// The places the daemon puts its control socket, most specific first: the user's runtime directory, the
/// system-wide runtime directory, then the user's data directory. Environment values are parameters (empty
/// counts as unset, as the XDG spec says) so this stays testable.
pub fn socket_candidates(
    xdg_runtime_dir: Option<&OsStr>,
    xdg_data_home: Option<&OsStr>,
    home: Option<&OsStr>,
) -> Vec<PathBuf> {
    let set = |value: Option<&OsStr>| value.filter(|v| !v.is_empty()).map(PathBuf::from);
    let socket_in = |dir: PathBuf| dir.join("remote-network").join("control.sock");
    let mut candidates = Vec::new();
    if let Some(runtime) = set(xdg_runtime_dir) {
        candidates.push(socket_in(runtime));
    }
    candidates.push(socket_in(PathBuf::from("/run")));
    // The XDG spec says relative values are invalid and must be ignored.
    let data_home = set(xdg_data_home)
        .filter(|dir| dir.is_absolute())
        .or_else(|| set(home).map(|home| home.join(".local").join("share")));
    if let Some(data_home) = data_home {
        candidates.push(socket_in(data_home));
    }
    candidates
}

/// Socket candidates from this process's environment.
pub fn socket_candidates_from_env() -> Vec<PathBuf> {
    socket_candidates(
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        std::env::var_os("XDG_DATA_HOME").as_deref(),
        std::env::var_os("HOME").as_deref(),
    )
}

const START_HINT: &str = "start one with 'remote-network start'";

/// A target resolved against the file system, remembering how it was found for the error message.
#[derive(Debug, Clone)]
pub struct Located {
    target: Target,
    /// Every candidate looked at, when the socket was discovered rather than given.
    looked_at: Option<Vec<PathBuf>>,
}

/// Turns a choice into a concrete target; discovery picks the first candidate that exists.
pub fn locate(choice: Choice, candidates: &[PathBuf]) -> Result<Located, Failure> {
    match choice {
        Choice::Socket(path) => Ok(Located { target: Target::Unix(path), looked_at: None }),
        Choice::Endpoint(url) => Ok(Located { target: Target::Tcp(url), looked_at: None }),
        // A socket in a directory we may not enter (the service's 0750 runtime directory) is not "missing": it
        // is picked, so that the connection fails with "permission denied" and the message says what to do.
        Choice::Discover => match candidates.iter().find(|path| exists_or_forbidden(path)) {
            Some(path) => {
                Ok(Located { target: Target::Unix(path.clone()), looked_at: Some(candidates.to_vec()) })
            }
            None => Err(Failure::Connect(format!(
                "no remote-network daemon is listening (looked at {}); {START_HINT} or pass --socket PATH",
                list_sockets(candidates)
            ))),
        },
    }
}

/// Connects, giving up after `timeout` (if any) so an unresponsive TCP endpoint cannot hang rnctl.
pub async fn connect(located: &Located, timeout: Option<Duration>) -> Result<Channel, Failure> {
    let attempt = client::connect(&located.target);
    let result = match timeout {
        Some(limit) => match tokio::time::timeout(limit, attempt).await {
            Ok(result) => result.map_err(|error| describe_connect_error(&error)),
            Err(_) => Err(format!("no answer within {}s", limit.as_secs_f64())),
        },
        None => attempt.await.map_err(|error| describe_connect_error(&error)),
    };
    result.map_err(|reason| Failure::Connect(connect_failure_message(located, &reason)))
}

fn exists_or_forbidden(path: &std::path::Path) -> bool {
    match std::fs::metadata(path) {
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::PermissionDenied,
    }
}

/// The one line printed when connecting failed.
fn connect_failure_message(located: &Located, reason: &str) -> String {
    let target = &located.target;
    if reason == PERMISSION_DENIED {
        return format!(
            "permission denied on {target}: the control socket belongs to the daemon's user and group; add \
             yourself to that group (for the systemd service: sudo usermod -aG remote-network $USER, then log in \
             again) or run rnctl as that user"
        );
    }
    match (&located.looked_at, target) {
        (Some(candidates), _) => format!(
            "no remote-network daemon is listening (looked at {}; {target}: {reason}); {START_HINT} or pass \
             --socket PATH",
            list_sockets(candidates)
        ),
        (None, Target::Unix(_)) => {
            format!(
                "no remote-network daemon is listening at {target} ({reason}); {START_HINT} or check --socket"
            )
        }
        (None, Target::Tcp(_)) => {
            format!(
                "no remote-network daemon is listening at {target} ({reason}); {START_HINT} or check --endpoint"
            )
        }
    }
}

fn list_sockets(paths: &[PathBuf]) -> String {
    paths.iter().map(|path| Target::Unix(path.clone()).to_string()).collect::<Vec<_>>().join(", ")
}

/// A short reason for a failed connection. tonic wraps the interesting part (usually an `io::Error`) several
/// layers down behind a generic "transport error".
fn describe_connect_error(error: &tonic::transport::Error) -> String {
    let mut innermost: &dyn std::error::Error = error;
    let mut cause = error.source();
    while let Some(next) = cause {
        if let Some(io_error) = next.downcast_ref::<io::Error>() {
            return describe_io_error(io_error);
        }
        innermost = next;
        cause = next.source();
    }
    innermost.to_string()
}

const PERMISSION_DENIED: &str = "permission denied";

fn describe_io_error(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::NotFound => "no such socket".to_owned(),
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::PermissionDenied => PERMISSION_DENIED.to_owned(),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(text: &str) -> Option<&OsStr> {
        Some(OsStr::new(text))
    }

    #[test]
    fn candidates_in_order_with_all_variables_set() {
        let candidates = socket_candidates(os("/run/user/1000"), os("/data"), os("/home/me"));
        assert_eq!(
            candidates,
            [
                PathBuf::from("/run/user/1000/remote-network/control.sock"),
                PathBuf::from("/run/remote-network/control.sock"),
                PathBuf::from("/data/remote-network/control.sock"),
            ]
        );
    }

    #[test]
    fn data_home_defaults_to_home_local_share() {
        let candidates = socket_candidates(None, None, os("/root"));
        assert_eq!(
            candidates,
            [
                PathBuf::from("/run/remote-network/control.sock"),
                PathBuf::from("/root/.local/share/remote-network/control.sock"),
            ]
        );
    }

    #[test]
    fn empty_or_relative_variables_count_as_unset() {
        let candidates = socket_candidates(os(""), os("relative/dir"), os("/home/me"));
        assert_eq!(
            candidates,
            [
                PathBuf::from("/run/remote-network/control.sock"),
                PathBuf::from("/home/me/.local/share/remote-network/control.sock"),
            ]
        );
        assert_eq!(
            socket_candidates(None, os(""), None),
            [PathBuf::from("/run/remote-network/control.sock")]
        );
    }

    #[test]
    fn flag_beats_environment_and_same_level_conflicts() {
        let socket = |origin| Some((PathBuf::from("/s"), origin));
        let endpoint = |origin| Some(("http://h:1".to_owned(), origin));
        assert_eq!(choose(None, None).ok(), Some(Choice::Discover));
        assert_eq!(choose(socket(Origin::Env), None).ok(), Some(Choice::Socket("/s".into())));
        assert_eq!(choose(None, endpoint(Origin::Env)).ok(), Some(Choice::Endpoint("http://h:1".into())));
        assert_eq!(
            choose(socket(Origin::Flag), endpoint(Origin::Env)).ok(),
            Some(Choice::Socket("/s".into()))
        );
        assert_eq!(
            choose(socket(Origin::Env), endpoint(Origin::Flag)).ok(),
            Some(Choice::Endpoint("http://h:1".into()))
        );
        assert!(matches!(choose(socket(Origin::Flag), endpoint(Origin::Flag)), Err(Failure::Usage(_))));
        assert!(matches!(choose(socket(Origin::Env), endpoint(Origin::Env)), Err(Failure::Usage(_))));
    }

    #[test]
    fn empty_values_count_as_unset() {
        let choice = choose(Some((PathBuf::new(), Origin::Env)), Some(("http://h:1".into(), Origin::Env)));
        assert_eq!(choice.ok(), Some(Choice::Endpoint("http://h:1".into())));
    }

    #[test]
    fn discovery_reports_every_place_it_looked() {
        let candidates = [PathBuf::from("/nonexistent/a.sock"), PathBuf::from("/nonexistent/b.sock")];
        match locate(Choice::Discover, &candidates) {
            Err(Failure::Connect(message)) => assert_eq!(
                message,
                "no remote-network daemon is listening (looked at unix:/nonexistent/a.sock, \
                 unix:/nonexistent/b.sock); start one with 'remote-network start' or pass --socket PATH"
            ),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn discovery_picks_the_first_existing_candidate() {
        // The directory containing this test's source certainly exists; a path under /nonexistent does not.
        let existing = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let candidates = [PathBuf::from("/nonexistent/a.sock"), existing.clone()];
        let located = locate(Choice::Discover, &candidates).expect("found");
        assert!(matches!(located.target, Target::Unix(path) if path == existing));
    }
}
