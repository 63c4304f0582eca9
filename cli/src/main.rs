//! `rnctl`: the command-line client of a remote-network node.
//!
//! This file parses the command line, settles the options every command shares (where the daemon is, the
//! token, the deadline), connects, dispatches, and turns the outcome into an exit status. The subcommands live
//! in `commands`, and how results look in `render` (text) and `json`.

mod args;
mod commands;
mod daemon;
mod exit;
mod json;
mod output;
mod render;
mod table;
mod target;
mod timefmt;

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use remote_network::api::client::BearerToken;

use crate::args::{Cli, Command, DaemonCommand, PeersCommand};
use crate::daemon::Daemon;
use crate::exit::Failure;
use crate::output::Printer;
use crate::target::Origin;

fn main() -> ExitCode {
    // Parsing through ArgMatches (rather than `Cli::parse`) keeps where each value came from, which decides
    // between a flag and an environment variable.
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    match run(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if let Some(message) = failure.message() {
                // Nothing useful is left to do if stderr is gone too.
                let _ = writeln!(io::stderr(), "rnctl: {message}");
            }
            failure.exit().into()
        }
    }
}

fn run(cli: Cli, matches: &ArgMatches) -> Result<(), Failure> {
    let Cli { global, command } = cli;
    let command = match command {
        Command::Completions { shell } => return print_completions(shell),
        Command::Daemon(command) => command,
    };

    // Everything that can be checked locally is, before trying to connect.
    let choice = target::choose(
        global.socket.map(|path| (path, origin(matches, "socket"))),
        global.endpoint.map(|url| (url, origin(matches, "endpoint"))),
    )?;
    let token = bearer_token(
        global.token.map(|token| (token, origin(matches, "token"))),
        global.token_file.as_deref(),
    )?;
    let mut printer = Printer::new(global.output)?;
    let located = target::locate(choice, &target::socket_candidates_from_env())?;
    let deadline = global.timeout.0;
    let call_deadline = match matches.value_source("timeout") {
        Some(ValueSource::DefaultValue) | None if dials_a_peer(&command) => Some(DIAL_CALL_TIMEOUT),
        _ => deadline,
    };

    // One thread is plenty for one request at a time.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|error| {
        Failure::Other(anyhow::Error::new(error).context("cannot start the async runtime"))
    })?;
    runtime.block_on(async {
        let channel = target::connect(&located, deadline).await?;
        let daemon = Daemon::new(channel, token, call_deadline);
        commands::run(command, &daemon, &mut printer).await
    })
}

/// How long `connect` and `peers query` wait for their answer when `--timeout` is not given. The daemon dials
/// with its own deadlines (a QUIC handshake gives up after 10 s by default, a Hello after 10 s more, and a
/// node id may mean four stored addresses, a hole punch and a relay) and answers with what went wrong; a
/// client deadline as short as the handshake's would hide that answer behind "the daemon did not answer".
const DIAL_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether the command makes the daemon dial a peer, which takes longer than answering from its state.
fn dials_a_peer(command: &DaemonCommand) -> bool {
    matches!(command, DaemonCommand::Connect { .. } | DaemonCommand::Peers(PeersCommand::Query { .. }))
}

/// Whether an option was given on the command line or through its environment variable.
fn origin(matches: &ArgMatches, id: &str) -> Origin {
    match matches.value_source(id) {
        Some(ValueSource::EnvVariable) => Origin::Env,
        _ => Origin::Flag,
    }
}

/// The bearer token to present, if any.
fn bearer_token(token: Option<(String, Origin)>, token_file: Option<&Path>) -> Result<BearerToken, Failure> {
    let token = token_text(token, token_file)?;
    BearerToken::new(token.as_deref()).map_err(|error| Failure::Usage(format!("invalid token: {error}")))
}

/// The token from `--token`/`RNCTL_TOKEN` or `--token-file`. Two flags conflict; a `--token-file` flag overrides
/// an exported `RNCTL_TOKEN`. An empty value means no token.
fn token_text(token: Option<(String, Origin)>, token_file: Option<&Path>) -> Result<Option<String>, Failure> {
    match (token, token_file) {
        (Some((_, Origin::Flag)), Some(_)) => {
            Err(Failure::Usage("--token and --token-file cannot be used together".to_owned()))
        }
        (_, Some(path)) => read_token_file(path).map(Some),
        (Some((token, _)), None) => Ok(Some(token).filter(|token| !token.is_empty())),
        (None, None) => Ok(None),
    }
}

fn read_token_file(path: &Path) -> Result<String, Failure> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|error| Failure::Usage(format!("cannot read --token-file {shown}: {error}")))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(Failure::Usage(format!("--token-file {shown} is empty")));
    }
    Ok(token.to_owned())
}

/// Prints a completion script. Generated into memory first: clap_complete panics if writing fails, and a
/// closed pipe should not be a panic.
fn print_completions(shell: clap_complete::Shell) -> Result<(), Failure> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "rnctl", &mut script);
    let mut stdout = io::stdout().lock();
    stdout.write_all(&script)?;
    stdout.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_flag_and_file_conflict() {
        let token = Some(("t".to_owned(), Origin::Flag));
        let result = token_text(token, Some(Path::new("/nonexistent/token")));
        assert!(matches!(result, Err(Failure::Usage(message)) if message.contains("together")));
    }

    #[test]
    fn token_file_overrides_the_environment() {
        let token = Some(("from-env".to_owned(), Origin::Env));
        // The file is read (and here fails to be), rather than the environment's token being used.
        let result = token_text(token, Some(Path::new("/nonexistent/token")));
        assert!(matches!(result, Err(Failure::Usage(message)) if message.contains("/nonexistent/token")));
    }

    #[test]
    fn token_file_is_trimmed() {
        let path = std::env::temp_dir().join(format!("rnctl-token-test-{}", std::process::id()));
        std::fs::write(&path, "  s3cret\n").expect("temp file");
        let result = token_text(None, Some(&path));
        let _ = std::fs::remove_file(&path);
        assert_eq!(result.ok(), Some(Some("s3cret".to_owned())));
    }

    #[test]
    fn empty_token_means_none() {
        assert_eq!(token_text(Some((String::new(), Origin::Env)), None).ok(), Some(None));
        assert_eq!(token_text(None, None).ok(), Some(None));
    }
}
