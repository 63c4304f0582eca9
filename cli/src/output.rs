//! Where results go: standard output, either as table-mode text or as proto3 JSON (pretty for one response,
//! one compact object per line for streams). Every write is flushed so `peers watch` output reaches a pipe as it
//! happens, and a closed pipe ends the command quietly instead of with a panic.

use std::io::{self, Write};

use crate::args::OutputFormat;
use crate::exit::Failure;
use crate::json::{ApiMessage, ProtoJson};

pub struct Printer {
    /// Present in JSON mode only: decoding the descriptor set is wasted work for table mode.
    json: Option<ProtoJson>,
    stdout: io::Stdout,
}

impl Printer {
    pub fn new(format: OutputFormat) -> Result<Self, Failure> {
        let json = match format {
            OutputFormat::Table => None,
            OutputFormat::Json => Some(ProtoJson::new().map_err(Failure::Other)?),
        };
        Ok(Self { json, stdout: io::stdout() })
    }

    pub fn is_json(&self) -> bool {
        self.json.is_some()
    }

    /// Prints a response: as pretty JSON in JSON mode, else as the text `table` renders from it.
    pub fn response<M: ApiMessage>(
        &mut self,
        message: &M,
        table: impl FnOnce(&M) -> String,
    ) -> Result<(), Failure> {
        match &self.json {
            Some(json) => {
                let mut text = json.pretty(message).map_err(Failure::Other)?;
                text.push('\n');
                self.write(&text)
            }
            None => self.write(&table(message)),
        }
    }

    /// Prints one message of a stream: a single compact JSON line in JSON mode, else the text `table` renders.
    pub fn stream_item<M: ApiMessage>(
        &mut self,
        message: &M,
        table: impl FnOnce(&M) -> String,
    ) -> Result<(), Failure> {
        let mut line = match &self.json {
            Some(json) => json.compact(message).map_err(Failure::Other)?,
            None => table(message),
        };
        if !line.ends_with('\n') {
            line.push('\n');
        }
        self.write(&line)
    }

    /// Prints table-mode text, adding the final newline if missing.
    pub fn text(&mut self, text: &str) -> Result<(), Failure> {
        if text.ends_with('\n') { self.write(text) } else { self.write(&format!("{text}\n")) }
    }

    fn write(&mut self, text: &str) -> Result<(), Failure> {
        let mut stdout = self.stdout.lock();
        stdout.write_all(text.as_bytes())?;
        stdout.flush()?;
        Ok(())
    }
}
