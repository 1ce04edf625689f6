//! Logs on stderr: events through `tracing`, and the access log, one line per request, written here.

use crate::text;
use serde::Serialize;
use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` level.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A closed stderr must not bring the gateway down: tracing reports write failures with eprintln!, which
    // panics on a closed pipe, so it is told not to.
    // Colours only for a person at a terminal: escape codes in a log file or a collector are noise (and cost
    // a tenth of a free request's CPU).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stderr = Arc::new(Stderr::new());
    let _ = ACCESS_LOG.set(AccessLog { stderr: stderr.clone(), format });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(stderr)
        .with_ansi(ansi)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Where log lines go: whole lines, handed to one write(2) at a time on a duplicate of stderr. std's stderr handle
/// would take a process-wide lock for every line, which the worker threads' access logs contend on.
enum Stderr {
    Duplicate(File),
    /// When stderr cannot be duplicated (out of descriptors, or closed).
    Shared,
}

impl Stderr {
    fn new() -> Stderr {
        match std::io::stderr().as_fd().try_clone_to_owned() {
            Ok(fd) => Stderr::Duplicate(File::from(fd)),
            Err(_) => Stderr::Shared,
        }
    }
}

impl Write for &Stderr {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        match self {
            Stderr::Duplicate(file) => (&*file).write(line),
            Stderr::Shared => std::io::stderr().write(line),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where access-log lines go once [`init`] has run; before that (a library user, the tests) they go nowhere.
static ACCESS_LOG: OnceLock<AccessLog> = OnceLock::new();

struct AccessLog {
    stderr: Arc<Stderr>,
    format: LogFormat,
}

impl AccessLog {
    fn write(&self, lines: &[u8]) {
        // A full disk or a closed stderr loses the lines, never the request.
        let _ = (&*self.stderr).write_all(lines);
    }
}

/// Pipes keep a write of up to this many bytes whole: a batch of lines from one thread is never split by
/// another thread's writes.
const PIPE_BUF: usize = 4096;

thread_local! {
    /// This thread's access lines not yet written, and whether it holds them for a batch (a worker does,
    /// until its runtime runs out of work). The buffer is reused: a request's line allocates nothing.
    static LINES: RefCell<PendingLines> = const { RefCell::new(PendingLines { buffer: Vec::new(), held: false }) };
}

struct PendingLines {
    buffer: Vec<u8>,
    held: bool,
}

impl PendingLines {
    /// After a line was appended from `line_start`: the bytes to write now, and what stays pending. Unheld,
    /// every line goes at once; held, lines gather up to [`PIPE_BUF`] bytes (a longer line goes alone).
    fn write_due(&mut self, line_start: usize, mut write: impl FnMut(&[u8])) {
        if self.held && line_start > 0 && self.buffer.len() > PIPE_BUF {
            write(&self.buffer[..line_start]);
            self.buffer.drain(..line_start);
        }
        if !self.held || self.buffer.len() >= PIPE_BUF {
            self.flush(write);
        }
    }

    fn flush(&mut self, mut write: impl FnMut(&[u8])) {
        if !self.buffer.is_empty() {
            write(&self.buffer);
            self.buffer.clear();
        }
    }
}

/// From now until the guard drops, this thread's access lines are written in batches, when
/// [`flush_access_lines`] runs (a worker runtime's park hook: whenever it has no work left) or a batch is full.
/// Under load, one write(2) then carries many lines instead of one each; idle, a line is written as soon as
/// its request is done.
pub fn hold_access_lines() -> HeldAccessLines {
    LINES.with_borrow_mut(|lines| lines.held = true);
    HeldAccessLines(())
}

/// Returned by [`hold_access_lines`]: dropping it writes what is pending and stops holding lines.
pub struct HeldAccessLines(());

impl Drop for HeldAccessLines {
    fn drop(&mut self) {
        flush_access_lines();
        let _ = LINES.try_with(|lines| lines.borrow_mut().held = false);
    }
}

/// Writes this thread's pending access lines.
pub fn flush_access_lines() {
    let Some(log) = ACCESS_LOG.get() else { return };
    let _ = LINES.try_with(|lines| lines.borrow_mut().flush(|bytes| log.write(bytes)));
}

/// A request on a public listener and what became of it.
#[derive(Serialize)]
pub struct AccessLine<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: u16,
    #[serde(rename = "latency_ms", serialize_with = "milliseconds")]
    pub latency: Duration,
    pub client: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction: Option<&'a str>,
}

/// Writes `line` to the access log, in the shape of the other log lines (target `access`, level INFO, so
/// `RUST_LOG` filters it as any event). Formatted here rather than by `tracing`'s formatter, which cost a
/// seventh of a free request's user-space CPU.
pub fn access(line: &AccessLine) {
    let Some(log) = ACCESS_LOG.get() else { return };
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    LINES.with_borrow_mut(|lines| {
        let line_start = lines.buffer.len();
        let buffer = &mut lines.buffer;
        match log.format {
            LogFormat::Text => line.write_text(buffer),
            LogFormat::Json => {
                let json = JsonLine { timestamp: Now, level: "INFO", line, target: "access" };
                if serde_json::to_writer(&mut *buffer, &json).is_err() {
                    buffer.truncate(line_start);
                    return;
                }
            }
        }
        buffer.push(b'\n');
        lines.write_due(line_start, |bytes| log.write(bytes));
    });
}

impl AccessLine<'_> {
    /// `2026-01-01T00:00:00.000000Z  INFO access: method=GET path="/a" ...`: strings quoted and escaped, so
    /// nothing a client sends can forge a line.
    fn write_text(&self, buffer: &mut Vec<u8>) {
        buffer.extend_from_slice(&text::timestamp_now());
        buffer.extend_from_slice(b"  INFO access: method=");
        buffer.extend_from_slice(self.method.as_bytes());
        buffer.extend_from_slice(b" path=");
        text::push_quoted(buffer, self.path);
        buffer.extend_from_slice(b" route=");
        text::push_quoted(buffer, self.route);
        buffer.extend_from_slice(b" status=");
        text::push_number(buffer, self.status);
        // u64: 2^64 µs is beyond any request.
        let micros = u64::try_from(self.latency.as_micros()).unwrap_or(u64::MAX);
        buffer.extend_from_slice(b" latency_ms=");
        text::push_number(buffer, micros / 1000);
        let thousandths = micros % 1000;
        buffer.extend_from_slice(match thousandths {
            0..=9 => b".00",
            10..=99 => b".0",
            _ => b".",
        });
        text::push_number(buffer, thousandths);
        buffer.extend_from_slice(b" client=");
        text::push_ip(buffer, self.client);
        let quoted = [
            (&b" payer="[..], self.payer.as_deref()),
            (b" amount=", self.amount.as_deref()),
            (b" network=", self.network),
        ];
        for (name, value) in quoted {
            if let Some(value) = value {
                buffer.extend_from_slice(name);
                text::push_quoted(buffer, value);
            }
        }
        if let Some(id) = self.ledger_id {
            buffer.extend_from_slice(b" ledger_id=");
            text::push_number(buffer, id);
        }
        if let Some(transaction) = self.transaction {
            buffer.extend_from_slice(b" transaction=");
            text::push_quoted(buffer, transaction);
        }
    }
}

/// The line as `--log-format json` writes events: timestamp and level first, target last.
#[derive(Serialize)]
struct JsonLine<'a> {
    timestamp: Now,
    level: &'static str,
    #[serde(flatten)]
    line: &'a AccessLine<'a>,
    target: &'static str,
}

/// The current time as the other log lines show it (RFC 3339, UTC, microseconds).
struct Now;

impl Serialize for Now {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let now = text::timestamp_now();
        // ASCII digits and punctuation only.
        serializer.serialize_str(std::str::from_utf8(&now).unwrap_or_default())
    }
}

fn milliseconds<S: serde::Serializer>(latency: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(latency.as_micros() as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_quote_what_a_client_sent() {
        let line = AccessLine {
            method: "GET",
            path: "/a\"b\nINFO forged",
            route: "/*",
            status: 402,
            latency: Duration::from_micros(12_345),
            client: IpAddr::from([127, 0, 0, 1]),
            payer: Some("0xAb".into()),
            amount: None,
            network: Some("eip155:8453"),
            ledger_id: Some(7),
            transaction: None,
        };
        let mut buffer = Vec::new();
        line.write_text(&mut buffer);
        let text = String::from_utf8(buffer).unwrap();
        let fields = text.split_once("Z  INFO access: ").map(|(_, fields)| fields);
        assert_eq!(
            fields,
            Some(
                r#"method=GET path="/a\"b\nINFO forged" route="/*" status=402 latency_ms=12.345 client=127.0.0.1 payer="0xAb" network="eip155:8453" ledger_id=7"#
            ),
            "{text}"
        );
        assert!(!text.contains('\n'));
    }

    #[test]
    fn text_lines_pad_the_latency_and_show_any_client() {
        let line = AccessLine {
            method: "POST",
            path: "/v1/chat/completions",
            route: "/v1/*",
            status: 200,
            latency: Duration::from_micros(3_042),
            client: "2001:db8::1".parse().unwrap(),
            payer: None,
            amount: Some("1000".into()),
            network: None,
            ledger_id: None,
            transaction: Some("0xabc"),
        };
        let mut buffer = Vec::new();
        line.write_text(&mut buffer);
        let text = String::from_utf8(buffer).unwrap();
        assert!(
            text.ends_with(
                r#"INFO access: method=POST path="/v1/chat/completions" route="/v1/*" status=200 latency_ms=3.042 client=2001:db8::1 amount="1000" transaction="0xabc""#
            ),
            "{text}"
        );
        assert_eq!(text.find("Z  INFO"), Some(text::TIMESTAMP_LEN - 1), "{text}");
    }

    /// Appends `line` and returns what was written.
    fn push(pending: &mut PendingLines, line: &[u8]) -> Vec<Vec<u8>> {
        let line_start = pending.buffer.len();
        pending.buffer.extend_from_slice(line);
        let mut written = Vec::new();
        pending.write_due(line_start, |bytes| written.push(bytes.to_vec()));
        written
    }

    #[test]
    fn unheld_lines_are_written_one_by_one() {
        let mut pending = PendingLines { buffer: Vec::new(), held: false };
        assert_eq!(push(&mut pending, b"a\n"), [b"a\n".to_vec()]);
        assert_eq!(push(&mut pending, b"b\n"), [b"b\n".to_vec()]);
        assert!(pending.buffer.is_empty());
    }

    #[test]
    fn held_lines_are_written_in_whole_batches_of_at_most_a_pipe_buffer() {
        let mut pending = PendingLines { buffer: Vec::new(), held: true };
        let line = [b"x".repeat(999), b"\n".to_vec()].concat();
        for _ in 0..4 {
            assert!(push(&mut pending, &line).is_empty(), "4,000 bytes wait for the flush");
        }
        // The fifth line would make the batch longer than a pipe writes whole: the four go, it waits.
        assert_eq!(push(&mut pending, &line), [line.repeat(4)]);
        assert_eq!(pending.buffer, line);
        // A line longer than a batch goes alone, after what was pending.
        let long = [b"y".repeat(PIPE_BUF), b"\n".to_vec()].concat();
        assert_eq!(push(&mut pending, &long), [line.clone(), long]);
        let mut flushed = Vec::new();
        push(&mut pending, b"z\n");
        pending.flush(|bytes| flushed.push(bytes.to_vec()));
        assert_eq!(flushed, [b"z\n".to_vec()]);
        assert!(pending.buffer.is_empty());
    }
}
