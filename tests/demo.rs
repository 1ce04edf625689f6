//! `bash scripts/demo.sh`: one paid call on a local chain, from a fresh anvil to the ledger row, exits 0 and
//! leaves nothing running.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The address after `prefix` on the first line of `output` that starts with it (`anvil: http://127.0.0.1:9`).
fn address_after(output: &str, prefix: &str) -> SocketAddr {
    let line = output.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| panic!("no `{prefix}` line"));
    let address = line.trim_start_matches("http://").split_whitespace().next().unwrap_or_default();
    address.parse().unwrap_or_else(|_| panic!("not an address: {line}"))
}

/// Whether `text` has `0x` followed by 64 hex digits right after `prefix`.
fn has_hash_after(text: &str, prefix: &str) -> bool {
    text.match_indices(prefix).any(|(at, _)| {
        let rest = &text[at + prefix.len()..];
        rest.starts_with("0x") && rest.len() >= 66 && rest[2..66].bytes().all(|b| b.is_ascii_hexdigit())
    })
}

#[test]
fn the_demo_pays_one_call_on_a_local_chain_and_stops_what_it_started() {
    // Found as every chain test finds it: skipped with a message under a plain `cargo test`, required under
    // `bash scripts/test.sh`.
    let Some(anvil) = common::tools::require(common::tools::anvil()) else { return };
    // The binary under test, and the echo upstream built beside it (a build of the binary here would replace
    // the one the other tests run).
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let build = Command::new(cargo)
        .args(["build", "--offline", "--example", "echo_upstream"])
        .current_dir(repo_path(""))
        .output()
        .expect("run cargo build");
    assert!(build.status.success(), "{}", String::from_utf8_lossy(&build.stderr));
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_x402-gateway"));
    let echo_upstream = binary.parent().unwrap().join("examples/echo_upstream");
    let mut demo = Command::new("bash")
        .arg(repo_path("scripts/demo.sh"))
        .env("ANVIL", &anvil)
        .env("X402_GATEWAY_BIN", &binary)
        .env("ECHO_UPSTREAM_BIN", &echo_upstream)
        .env_remove("X402_GATEWAY_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bash scripts/demo.sh");
    let (mut stdout, mut stderr) = (demo.stdout.take().unwrap(), demo.stderr.take().unwrap());
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let out_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = demo.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = demo.kill();
            let _ = demo.wait();
            panic!("scripts/demo.sh did not finish within 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (output, errors) = (out_reader.join().unwrap(), err_reader.join().unwrap());
    assert_eq!(status.code(), Some(0), "{output}\n{errors}");

    assert!(output.contains("HTTP/1.1 402 Payment Required"), "the 402 is shown: {output}");
    assert!(output.contains("\nHTTP 200 OK\npayment sent: 1000 atomic units"), "the receipt: {output}");
    assert!(has_hash_after(&output, "settled: transaction "), "a transaction hash: {output}");
    assert!(has_hash_after(&output, "\ntransaction "), "the transaction, read from the chain: {output}");
    let row = output.lines().find(|l| l.trim_start().starts_with("1  settled")).expect("the ledger row");
    assert!(row.contains("/paid/*") && has_hash_after(row, "true    "), "{row}");
    // Everything it started has stopped: nothing answers where anvil, the echo upstream and the gateway were.
    let gateway = output
        .lines()
        .find_map(|l| l.split("listening addr=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("the gateway's address");
    for address in [address_after(&output, "anvil: "), address_after(&output, "echo upstream: "), gateway] {
        assert!(TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_err(), "{address} still answers");
    }
}
