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

/// Base Sepolia's USDC, a 0.05 USDC ceiling, named facilitator `UPTO_FACILITATOR`.
fn upto_offer() -> x402_proto::Offer {
    let network = x402_proto::networks::builtin(84532);
    let asset = network.asset("USDC").unwrap().clone();
    let domain_separator =
        x402_proto::exact_evm::domain(&asset.eip712_name, &asset.eip712_version, 84532, asset.address).separator();
    x402_proto::Offer {
        network: std::sync::Arc::new(network),
        asset,
        pay_to: PAY_TO.parse().unwrap(),
        amount: U256::from(50_000),
        max_timeout_seconds: 300,
        domain_separator,
        scheme: x402_proto::OfferScheme::Upto { facilitator: UPTO_FACILITATOR },
    }
}

const UPTO_FACILITATOR: alloy::primitives::Address =
    alloy::primitives::address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");

/// A seller written here, offering `upto` (and `exact` too on `/both`): it checks an `upto` payment as the
/// gateway's offline checks do and charges 1234 of the ceiling; `/no-allowance` answers a valid one 412, as
/// the gateway does for a buyer who never approved Permit2. The body names the scheme it was paid with.
async fn upto_seller() -> Upstream {
    use x402_proto::upto_evm;
    spawn_upstream(|request: http::Request<hyper::body::Incoming>| async move {
        let offer = upto_offer();
        let path = request.uri().path().to_string();
        let mut accepts = vec![x402_proto::requirements::requirements_v2(&offer)];
        if path == "/both" {
            let exact =
                x402_proto::Offer { scheme: x402_proto::OfferScheme::Exact, amount: U256::from(2000), ..offer.clone() };
            accepts.push(x402_proto::requirements::requirements_v2(&exact));
        }
        let challenge = |status: http::StatusCode, error: &str| {
            let required = serde_json::json!({
                "x402Version": 2, "error": error, "accepts": accepts,
                "resource": { "url": "http://127.0.0.1/v1/chat/completions", "description": "", "mimeType": "" },
            });
            let mut response = http::Response::new(x402_gateway::proxy::body::full("{}"));
            *response.status_mut() = status;
            response.headers_mut().insert("payment-required", x402_proto::codec::encode(&required).parse().unwrap());
            response
        };
        let Some(header) = request.headers().get("payment-signature") else {
            return challenge(http::StatusCode::PAYMENT_REQUIRED, "PAYMENT-SIGNATURE header is required");
        };
        let payment: serde_json::Value = x402_proto::codec::decode(header.as_bytes()).unwrap();
        let scheme = payment["accepted"]["scheme"].as_str().unwrap_or("").to_string();
        if scheme == "upto" {
            let checked =
                upto_evm::verify_signed(&payment["payload"], payment.get("extensions"), &offer, UPTO_FACILITATOR)
                    .and_then(|auth| upto_evm::check_window(&auth, &offer, x402_proto::unix_now()).map(|()| auth));
            let auth = match checked {
                Ok(auth) => auth,
                Err(refused) => return challenge(http::StatusCode::PAYMENT_REQUIRED, refused.reason()),
            };
            if path == "/no-allowance" {
                return challenge(http::StatusCode::PRECONDITION_FAILED, "permit2_allowance_required");
            }
            let receipt = serde_json::json!({
                "success": true, "transaction": format!("0x{}", "ab".repeat(32)), "network": offer.network.caip2,
                "payer": auth.from.to_string(), "amount": "1234",
            });
            let mut response = http::Response::new(x402_gateway::proxy::body::full(format!("paid with {scheme}")));
            response.headers_mut().insert("payment-response", x402_proto::codec::encode(&receipt).parse().unwrap());
            return response;
        }
        http::Response::new(x402_gateway::proxy::body::full(format!("paid with {scheme}")))
    })
    .await
}

#[tokio::test]
async fn pay_signs_upto_offers_as_the_official_clients_do_and_says_when_permit2_needs_approving() {
    let seller = upto_seller().await;
    let key = Some(alloy::hex::encode_prefixed(PrivateKeySigner::random().to_bytes()));
    let args = |path: &str, extra: &[&str]| {
        let mut args = vec![format!("{}{path}", seller.url()), "--key-env".into(), "X402_TEST_PAY_KEY".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    let output = run_pay(args("/upto", &[]), key.clone()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "HTTP 200 OK", "{stdout}");
    assert!(
        lines[1].starts_with("payment sent: upto, at most 50000 atomic units of ") && lines[1].ends_with(PAY_TO),
        "{stdout}"
    );
    assert_eq!(
        lines[2],
        format!("settled: charged 1234 atomic units, transaction 0x{} on eip155:84532", "ab".repeat(32))
    );
    assert!(stdout.contains("paid with upto"), "{stdout}");

    // Both offered: `exact` unless `upto` is asked for.
    let output = run_pay(args("/both", &[]), key.clone()).await;
    assert!(String::from_utf8_lossy(&output.stdout).contains("paid with exact"), "{output:?}");
    let output = run_pay(args("/both", &["--scheme", "upto"]), key.clone()).await;
    assert!(String::from_utf8_lossy(&output.stdout).contains("paid with upto"), "{output:?}");

    // A buyer that never approved Permit2: told what to do, and that nothing was charged.
    let output = run_pay(args("/no-allowance", &[]), key.clone()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.starts_with("HTTP 412 Precondition Failed\n"), "{stdout}");
    assert!(stdout.contains("refused: permit2_allowance_required; nothing was charged."), "{stdout}");
    assert!(stdout.contains("approve(spender = Permit2 0x000000000022D473030F116dDEE9F6B43aC78BA3"), "{stdout}");

    // The ceiling counts against --max-amount; v1 has no `upto`; an `exact`-only buyer finds nothing here.
    let output = run_pay(args("/upto", &["--max-amount", "49999"]), key.clone()).await;
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("the ceiling 50000 is above --max-amount 49999"),
        "{output:?}"
    );
    let output = run_pay(args("/upto", &["--v1", "--scheme", "upto"]), key.clone()).await;
    assert!(String::from_utf8_lossy(&output.stderr).contains("`upto` is paid with x402 v2 only"), "{output:?}");
    let output = run_pay(args("/upto", &["--scheme", "exact"]), key.clone()).await;
    assert!(String::from_utf8_lossy(&output.stderr).contains("no `exact` offer on an EVM network"), "{output:?}");
    assert_eq!(seller.hits(), 4 * 2 + 3, "each run that paid asked twice, each refused one once");
}
