use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::Arc;
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Arc::new(Stderr::new()))
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
