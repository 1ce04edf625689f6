//! The reference x402 facilitator (`tests/interop/facilitator.mjs`: `@x402/core` + `@x402/evm`) as a child
//! process on loopback, settling on a test chain.

use super::chain::Chain;
use super::tools::Node;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

pub struct Facilitator {
    pub url: String,
    pub port: u16,
    child: Child,
}

impl Drop for Facilitator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts it on `port` (0: the kernel picks) and waits until it listens.
pub fn start_reference_facilitator(node: &Node, chain: &Chain, port: u16) -> Facilitator {
    spawn(node, chain, port, &chain.facilitator_key, &[])
}

/// One of several on `chain`, each signing with its own `key` (funded there), on a chain that mines a block
/// every second besides each transaction's (`Chain::keep_mining`), as viem then expects.
pub fn start_reference_facilitator_with_key(node: &Node, chain: &Chain, key: &str) -> Facilitator {
    spawn(node, chain, 0, key, &["--block-time-ms", "1000"])
}

fn spawn(node: &Node, chain: &Chain, port: u16, key: &str, options: &[&str]) -> Facilitator {
    let mut child = node
        .script("facilitator.mjs")
        .args(["--rpc", &chain.rpc_url, "--key-env", "X402_TEST_FACILITATOR_KEY", "--port", &port.to_string()])
        .args(options)
        .env("X402_TEST_FACILITATOR_KEY", key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("node runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line).expect("facilitator output");
    let ready: Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("facilitator.mjs did not start: {line:?}"));
    let port = ready["port"].as_u64().and_then(|p| u16::try_from(p).ok()).expect("a port");
    Facilitator { url: format!("http://127.0.0.1:{port}"), port, child }
}
