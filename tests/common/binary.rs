//! The gateway's own binary, for the tests that kill it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts the gateway on `config`; its log goes to `gateway.log` beside the configuration, for a failure's
/// post-mortem.
pub fn start(config: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.with_file_name("gateway.log"))
        .expect("log file");
    Command::new(env!("CARGO_BIN_EXE_x402-gateway"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the gateway")
}

/// Waits (20 s at most) until the gateway started on `config` accepts connections on `port`.
pub async fn wait_listening(port: u16, config: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() >= deadline {
            panic!("the gateway did not come up; its log:\n{}", log(config));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the gateway started on `config` has logged.
pub fn log(config: &Path) -> String {
    std::fs::read_to_string(config.with_file_name("gateway.log")).unwrap_or_default()
}
