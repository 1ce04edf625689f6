//! `x402-gateway pay URL`: the seller's own test client pays a gateway on a local chain.

mod common;

use alloy::primitives::U256;
use alloy::signers::local::PrivateKeySigner;
use common::chain::Chain;
use common::*;
use std::process::{Command, Output};

async fn run_pay(args: Vec<String>, key: Option<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_x402-gateway"));
        command.arg("pay").args(args).env_remove("X402_TEST_PAY_KEY");
        if let Some(key) = key {
            command.env("X402_TEST_PAY_KEY", key);
        }
        command.output().expect("the binary runs")
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn pay_settles_with_v2_and_v1_and_refuses_what_it_should() {
    let Some(chain) = Chain::shared().await else { return };
    let down = spawn_upstream(|_| async {
        let mut answer = http::Response::new(x402_gateway::proxy::body::full("down for maintenance"));
        *answer.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        answer
    })
    .await;
    let toml = paid_config(&spawn_echo("api").await.url(), "", "")
        + &format!("[upstreams.down]\nurl = \"{}\"\n", down.url())
        + "[[routes]]\npath = \"/paid\"\nupstream = \"api\"\nprice = \"$0.002\"\n"
        + "[[routes]]\npath = \"/down\"\nupstream = \"down\"\nprice = \"$0.002\"\n"
        + &chain.network_toml();
    let gateway = start_gateway(&toml).await;
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), 1_000_000).await;
    let key = Some(alloy::hex::encode_prefixed(buyer.to_bytes()));
    let base = |extra: &[&str]| {
        let mut args = vec![gateway.url("/paid"), "--key-env".to_string(), "X402_TEST_PAY_KEY".to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    for (flags, version_network) in [(vec![], "eip155:84532"), (vec!["--v1"], "base-sepolia")] {
        let output = run_pay(base(&flags), key.clone()).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines[0], "HTTP 200 OK", "{stdout}");
        assert!(lines[1].starts_with("payment sent: 2000 atomic units of ") && lines[1].ends_with(PAY_TO), "{stdout}");
        assert!(lines[2].starts_with("settled: transaction 0x"), "{stdout}");
        let settlement_line = stdout.lines().find_map(|l| l.strip_prefix("settlement: ")).expect("a settlement line");
        let settlement: serde_json::Value = serde_json::from_str(settlement_line).unwrap();
        assert_eq!(settlement["success"], true);
        assert_eq!(settlement["network"], version_network);
        assert!(stdout.contains("\"upstream\":\"api\""), "the body is printed: {stdout}");
    }
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await, U256::from(4000));

    // An upstream failure after the payment was verified: said as such, not as paid.
    let mut down_args = base(&[]);
    down_args[0] = gateway.url("/down");
    let output = run_pay(down_args, key.clone()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.starts_with("HTTP 503 Service Unavailable\npayment sent: 2000 atomic units"), "{stdout}");
    assert!(stdout.contains("\nnot settled: the answer carries no settlement, so nothing was charged\n"), "{stdout}");
    assert!(!stdout.contains("paid)") && !stdout.contains("settled: transaction"), "{stdout}");
    // A buyer without funds: the fresh challenge's reason.
    let broke = Some(alloy::hex::encode_prefixed(PrivateKeySigner::random().to_bytes()));
    let output = run_pay(base(&[]), broke).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("\nrefused: invalid_exact_evm_insufficient_balance; nothing was charged\n"), "{stdout}");
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await, U256::from(4000), "neither was charged");

    let too_dear = run_pay(base(&["--max-amount", "1999"]), key.clone()).await;
    assert_eq!(too_dear.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&too_dear.stderr).contains("above --max-amount"));
    let no_key = run_pay(base(&[]), None).await;
    assert_eq!(no_key.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("X402_TEST_PAY_KEY is not set"));
    let bad_key = run_pay(base(&[]), Some("0xnot-a-key".into())).await;
    assert!(!String::from_utf8_lossy(&bad_key.stderr).contains("not-a-key"), "the key is never echoed");
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await, U256::from(4000), "refused runs paid nothing");
}
