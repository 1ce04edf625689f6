//! Logs on stderr: events through `tracing`, and the access log, one line per request, written here.

use serde::Serialize;
use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
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

/// Where log lines go: each line is handed to one write(2) on a duplicate of stderr. std's stderr handle
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

thread_local! {
    /// The line being written, reused: a request's line allocates nothing.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
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
    LINE.with_borrow_mut(|buffer| {
        buffer.clear();
        let formatted = match log.format {
            LogFormat::Text => line.write_text(buffer),
            LogFormat::Json => {
                serde_json::to_writer(&mut *buffer, &JsonLine { timestamp: Now, level: "INFO", line, target: "access" })
                    .map_err(std::io::Error::from)
            }
        };
        if formatted.is_ok() {
            buffer.push(b'\n');
            // A full disk or a closed stderr loses the line, never the request.
            let _ = (&*log.stderr).write_all(buffer);
        }
    });
}

impl AccessLine<'_> {
    /// `2026-01-01T00:00:00.000000Z  INFO access: method=GET path="/a" ...`: strings quoted and escaped, so
    /// nothing a client sends can forge a line.
    fn write_text(&self, buffer: &mut Vec<u8>) -> std::io::Result<()> {
        let micros = self.latency.as_micros();
        write!(
            buffer,
            "{Now}  INFO access: method={} path={:?} route={:?} status={} latency_ms={}.{:03} client={}",
            self.method,
            self.path,
            self.route,
            self.status,
            micros / 1000,
            micros % 1000,
            self.client
        )?;
        let quoted = [("payer", self.payer.as_deref()), ("amount", self.amount.as_deref()), ("network", self.network)];
        for (name, value) in quoted {
            if let Some(value) = value {
                write!(buffer, " {name}={value:?}")?;
            }
        }
        if let Some(id) = self.ledger_id {
            write!(buffer, " ledger_id={id}")?;
        }
        if let Some(transaction) = self.transaction {
            write!(buffer, " transaction={transaction:?}")?;
        }
        Ok(())
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

impl std::fmt::Display for Now {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        SystemTime.format_time(&mut Writer::new(f))
    }
}

impl Serialize for Now {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
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
        line.write_text(&mut buffer).unwrap();
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
}
