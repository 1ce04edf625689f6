//! Batched settlement on a real local chain: a payment that finds no transaction in flight goes out at once,
//! the payments that arrive while one is in flight share one Multicall3 `aggregate3` transaction, each one's
//! outcome is its own, and a failing authorization never sinks the others.

mod common;

use alloy::primitives::{keccak256, Address, B256, U256};
use alloy::providers::Provider;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use common::chain::Chain;
use common::config::{GatewayToml, Network, Payment, Route};
use common::pay::{self, Authorization};
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PRICE: u64 = 1000;

/// A paid `/paid` route settled in-process on `network`; `batch` holds the batching settings of `[payment]`.
fn toml(upstream: &Upstream, network: Network, batch: &[(&str, i64)]) -> String {
    GatewayToml::new()
        .listen()
        .admin()
        .upstream("api", &upstream.url())
        .payment(batching(Payment::usdc().facilitator("local"), batch))
        .route(Route::paid("/paid", "api", &PRICE.to_string()))
        .network(network)
        .build()
}

/// `payment` with the batching settings `batch`.
fn batching(payment: Payment, batch: &[(&str, i64)]) -> Payment {
    batch.iter().fold(payment, |payment, &(key, value)| payment.set(key, value))
}

/// A signed `PAYMENT-SIGNATURE` for `/paid` from `buyer`, built from the gateway's own challenge.
async fn payment(gateway: &Gateway, buyer: &PrivateKeySigner) -> String {
    let answer = get(&gateway.url("/paid")).await;
    let challenge = pay::decode_header(&answer.headers["payment-required"]);
    let accepted = &challenge["accepts"][0];
    let auth = Authorization::for_offer(buyer.address(), accepted);
    pay::v2_header(&challenge["resource"], accepted, auth.sign(buyer))
}

async fn pay_all(gateway: &Gateway, headers: Vec<String>) -> Vec<Answer> {
    let calls = headers.into_iter().map(|header| {
        let request =
            Request::get(gateway.url("/paid")).header("payment-signature", header).body(Full::default()).unwrap();
        tokio::spawn(async move { send(&client(), request).await })
    });
    let mut answers = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        answers.push(call.await.unwrap());
    }
    answers
}

/// Waits (boundedly) until `count` ledger rows name their settlement transaction: every batch is formed and
/// signed, so a relay may hand out receipts again without changing which payments share a transaction.
async fn all_signed(gateway: &Gateway, count: usize) {
    let signed = async {
        loop {
            let rows = gateway.pipeline.ledger().list(None, None, None, 1000).await.unwrap();
            if rows.iter().filter(|row| row.transaction.is_some()).count() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), signed).await.expect("every payment signed into a transaction");
}

/// The settlement transaction named in an answer's `PAYMENT-RESPONSE`.
fn transaction(answer: &Answer) -> B256 {
    let receipt = pay::decode_header(&answer.headers["payment-response"]);
    receipt["transaction"].as_str().unwrap().parse().unwrap()
}

async fn funded_buyers(chain: &Chain, count: usize) -> Vec<PrivateKeySigner> {
    let mut buyers = Vec::new();
    for _ in 0..count {
        let buyer = PrivateKeySigner::random();
        chain.mint(buyer.address(), PRICE).await;
        buyers.push(buyer);
    }
    buyers
}

/// How many `AuthorizationUsed` events the transaction logged, and the gas it used.
async fn mined(chain: &Chain, hash: B256) -> (usize, u64) {
    let receipt = chain.provider.get_transaction_receipt(hash).await.unwrap().expect("mined");
    assert!(receipt.status(), "the settlement transaction succeeded");
    let event = keccak256("AuthorizationUsed(address,bytes32)");
    let used = receipt.inner.logs().iter().filter(|log| log.topics().first() == Some(&event)).count();
    (used, receipt.gas_used)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_that_finds_nothing_in_flight_goes_out_without_waiting_for_its_window() {
    let Some(chain) = Chain::shared().await else { return };
    let multicall = chain.deploy("Multicall").await;
    let upstream = spawn_echo("api").await;
    // The longest window allowed: both payments reach settlement well within it of each other, so a payment
    // held for its window would share its transaction with the other.
    let batched = [("settle_batch_max", 10), ("settle_batch_window_ms", 1000)];
    let gateway = start_gateway(&toml(&upstream, chain.network().multicall(multicall), &batched)).await;
    let buyers = funded_buyers(&chain, 2).await;
    let mut headers = Vec::new();
    for buyer in &buyers {
        headers.push(payment(&gateway, buyer).await);
    }

    let answers = pay_all(&gateway, headers).await;

    for answer in &answers {
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    let hashes: BTreeSet<B256> = answers.iter().map(transaction).collect();
    assert_eq!(hashes.len(), 2, "the first payment went out alone, without waiting for the second: {hashes:?}");
    for hash in hashes {
        assert_eq!(mined(&chain, hash).await.0, 1);
    }
    for buyer in &buyers {
        assert_eq!(chain.balance(buyer.address()).await, U256::ZERO, "each buyer paid once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_that_arrive_while_a_transaction_is_in_flight_share_the_next_and_cost_less_gas_each() {
    const BATCH: usize = 10;
    let Some(chain) = Chain::shared().await else { return };
    let multicall = chain.deploy("Multicall").await;
    let upstream = spawn_echo("api").await;
    // Receipts are withheld, as on a chain whose blocks take their time: the first transaction stays in flight
    // while the others arrive, and a full batch goes out at once, before its window (the longest allowed) ends.
    let relay = relay(&chain, multicall).await;
    relay.withholding.store(true, Ordering::SeqCst);
    let batched = [("settle_batch_max", BATCH as i64), ("settle_batch_window_ms", 1000)];
    let network = chain.network().multicall(multicall).rpc_url(&relay.upstream.url());
    let gateway = Arc::new(start_gateway(&toml(&upstream, network, &batched)).await);
    let buyers = funded_buyers(&chain, BATCH + 1).await;
    let mut headers = Vec::new();
    for buyer in &buyers {
        headers.push(payment(&gateway, buyer).await);
    }
    let before = chain.balance(PAY_TO.parse().unwrap()).await;

    let paying = tokio::spawn({
        let gateway = gateway.clone();
        async move { pay_all(&gateway, headers).await }
    });
    all_signed(&gateway, buyers.len()).await;
    relay.withholding.store(false, Ordering::SeqCst);
    let answers = paying.await.unwrap();

    for answer in &answers {
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    let hashes: BTreeSet<B256> = answers.iter().map(transaction).collect();
    let mut transactions = Vec::new();
    for hash in hashes {
        let receipt = chain.provider.get_transaction_receipt(hash).await.unwrap().expect("mined");
        let (used, gas) = mined(&chain, hash).await;
        transactions.push((receipt.block_number.unwrap(), used, gas));
    }
    transactions.sort();
    let carried: Vec<usize> = transactions.iter().map(|&(_, used, _)| used).collect();
    assert_eq!(carried, [1, BATCH], "the first payment alone, then the rest in one full batch");
    let (lone_gas, batch_gas) = (transactions[0].2, transactions[1].2);
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await - before, U256::from(PRICE * buyers.len() as u64));
    for buyer in &buyers {
        assert_eq!(chain.balance(buyer.address()).await, U256::ZERO, "each buyer paid once");
    }
    let per_payment = batch_gas / BATCH as u64;
    println!("gas: lone {lone_gas}, batch of {BATCH} {batch_gas} ({per_payment} per payment)");
    assert!(per_payment < lone_gas, "a batched payment costs less gas ({per_payment}) than a lone one ({lone_gas})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_authorization_does_not_sink_the_rest_of_its_batch() {
    let Some(chain) = Chain::shared().await else { return };
    let multicall = chain.deploy("Multicall").await;
    // The upstream answers the first request at once, and the others only once the gate opens: with
    // `settle = "after"`, every payment is verified and recorded, and none settled yet, while it waits.
    let (gate, opened) = tokio::sync::watch::channel(false);
    let answered = Arc::new(AtomicUsize::new(0));
    let upstream = spawn_upstream(move |_| {
        let (mut opened, first) = (opened.clone(), answered.fetch_add(1, Ordering::SeqCst) == 0);
        async move {
            if !first {
                let _ = opened.wait_for(|open| *open).await;
            }
            http::Response::new(x402_gateway::proxy::body::full("{}"))
        }
    })
    .await;
    // The first payment goes out alone and stays in flight, its receipt withheld, so that the others share
    // the next transaction.
    let relay = relay(&chain, multicall).await;
    relay.withholding.store(true, Ordering::SeqCst);
    let batched = [("settle_batch_max", 5), ("settle_batch_window_ms", 1000)];
    let network = chain.network().multicall(multicall).rpc_url(&relay.upstream.url());
    let gateway = Arc::new(start_gateway(&toml(&upstream, network, &batched)).await);
    let opener = funded_buyers(&chain, 1).await.remove(0);
    let buyers = funded_buyers(&chain, 5).await;
    let drained = &buyers[0];
    let opening = payment(&gateway, &opener).await;
    let mut headers = Vec::new();
    for buyer in &buyers {
        headers.push(payment(&gateway, buyer).await);
    }
    let before = chain.balance(PAY_TO.parse().unwrap()).await;
    let opened = tokio::spawn({
        let gateway = gateway.clone();
        async move { pay_all(&gateway, vec![opening]).await }
    });
    let in_flight = async {
        while relay.withheld.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), in_flight).await.expect("the first payment broadcast");

    let paying = tokio::spawn({
        let (gateway, headers) = (gateway.clone(), headers.clone());
        async move { pay_all(&gateway, headers).await }
    });
    // Every payment passed simulation and waits at the upstream: now the drained buyer's money leaves
    // through another authorization of its own.
    let all_waiting = async {
        while upstream.hits() < 1 + buyers.len() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), all_waiting).await.expect("every payment verified");
    let challenge = pay::decode_header(&get(&gateway.url("/paid")).await.headers["payment-required"]);
    let mut elsewhere = Authorization::for_offer(drained.address(), &challenge["accepts"][0]);
    elsewhere.message.to = chain.deployer;
    chain.land(&elsewhere.sign(drained)).await;
    gate.send_replace(true);
    all_signed(&gateway, 1 + buyers.len()).await;
    relay.withholding.store(false, Ordering::SeqCst);
    let answers = paying.await.unwrap();
    let opener_answer = opened.await.unwrap().remove(0);
    assert_eq!(opener_answer.status, StatusCode::OK, "{}", opener_answer.text());
    assert_eq!(mined(&chain, transaction(&opener_answer)).await.0, 1, "the first payment went out alone");

    let paid: Vec<&Answer> = answers.iter().filter(|a| a.status == StatusCode::OK).collect();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status == StatusCode::PAYMENT_REQUIRED).collect();
    assert_eq!(
        (paid.len(), refused.len()),
        (4, 1),
        "statuses: {:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    let refusal = pay::decode_header(&refused[0].headers["payment-response"]);
    assert_eq!(refusal["success"], false);
    assert_eq!(refusal["errorReason"], "invalid_exact_evm_transaction_failed");
    assert!(refused[0].text() != "{}", "the answer is withheld");
    let hashes: BTreeSet<B256> = paid.iter().map(|a| transaction(a)).collect();
    assert_eq!(hashes.len(), 1, "one transaction: {hashes:?}");
    let hash = *hashes.first().unwrap();
    assert_eq!(refusal["transaction"], hash.to_string(), "the failure names the batch it failed in");
    assert_eq!(mined(&chain, hash).await.0, 4);
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await - before, U256::from(5 * PRICE), "4 and the first");
    for buyer in &buyers {
        assert_eq!(chain.balance(buyer.address()).await, U256::ZERO);
    }
    let rows = gateway.pipeline.ledger().list(None, None, Some(drained.address().to_string()), 10).await.unwrap();
    let states: Vec<&str> = rows.iter().map(|r| r.state.as_str()).collect();
    assert_eq!(states, ["failed"], "the drained buyer was not charged, and the ledger says so");

    // The failed authorization went out in the batch's calldata: anyone may land it while it is valid. Once
    // someone does, reconciliation owes the buyer a refund, since it never got the answer.
    let failed = &rows[0];
    chain.mint(drained.address(), PRICE).await;
    let landed_by_someone = chain.land(&pay::decode_header(&headers[0].parse().unwrap())["payload"]).await;
    let report = gateway.pipeline.reconcile(pay::now() + 1).await.unwrap();
    assert_eq!(report.refunds, 1, "{report:?}");
    let row = gateway.pipeline.ledger().get(failed.id).await.unwrap().unwrap();
    assert_eq!(row.state, "refund_needed");
    assert_eq!(row.transaction, Some(landed_by_someone.to_string()));
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await - before, U256::from(6 * PRICE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_simulations_refuse_exactly_the_payments_that_cannot_settle() {
    let Some(chain) = Chain::shared().await else { return };
    let multicall = chain.deploy("Multicall").await;
    let upstream = spawn_echo("api").await;
    // The gateway reaches the chain through a relay that counts the simulations made through the multicall.
    let relay = relay(&chain, multicall).await;
    let batched = [("settle_batch_max", 20), ("settle_batch_window_ms", 50)];
    let network = chain.network().multicall(multicall).rpc_url(&relay.upstream.url());
    let gateway = start_gateway(&toml(&upstream, network, &batched)).await;
    let buyers = funded_buyers(&chain, 12).await;
    let broke = PrivateKeySigner::random();
    let mut headers = vec![payment(&gateway, &broke).await];
    for buyer in &buyers {
        headers.push(payment(&gateway, buyer).await);
    }
    // A second authorization from a buyer who can afford one: simulated with the first it fails there,
    // apart from it it passes and then fails in the batch. Either way it is not charged twice.
    headers.push(payment(&gateway, &buyers[0]).await);
    let before = chain.balance(PAY_TO.parse().unwrap()).await;

    let answers = pay_all(&gateway, headers).await;

    let statuses: Vec<StatusCode> = answers.iter().map(|a| a.status).collect();
    let broke_refusal = pay::decode_header(&answers[0].headers["payment-required"]);
    assert_eq!(answers[0].status, StatusCode::PAYMENT_REQUIRED, "{statuses:?}");
    assert_eq!(broke_refusal["error"], "invalid_exact_evm_insufficient_balance");
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), buyers.len(), "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::PAYMENT_REQUIRED).count(), 2, "{statuses:?}");
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await - before, U256::from(PRICE * buyers.len() as u64));
    for buyer in &buyers {
        assert_eq!(chain.balance(buyer.address()).await, U256::ZERO);
    }
    // 14 payments at once, two simulations in flight at a time: the rest went together through the multicall.
    let shared = relay.multicall_calls.load(Ordering::SeqCst);
    assert!(shared >= 1, "no simulation was shared ({} RPC requests in all)", relay.upstream.hits());
}

struct Relay {
    upstream: Upstream,
    /// `eth_call`s addressed to the multicall contract.
    multicall_calls: Arc<AtomicUsize>,
    /// While set, every receipt is answered "not mined yet", as on a chain whose blocks take their time: the
    /// settler's transactions stay in flight.
    withholding: Arc<AtomicBool>,
    /// Receipt requests answered so.
    withheld: Arc<AtomicUsize>,
}

/// A JSON-RPC relay to the chain that counts the `eth_call`s addressed to `multicall`, and withholds receipts
/// on demand.
async fn relay(chain: &Chain, multicall: Address) -> Relay {
    let node = chain.rpc_url.clone();
    let (multicall_calls, withholding, withheld): (Arc<AtomicUsize>, Arc<AtomicBool>, Arc<AtomicUsize>) =
        Default::default();
    let state = (multicall_calls.clone(), withholding.clone(), withheld.clone());
    let multicall = multicall.to_string().to_lowercase();
    let upstream = spawn_upstream(move |request: http::Request<hyper::body::Incoming>| {
        let (node, multicall) = (node.clone(), multicall.clone());
        let (counted, withholding, withheld) = state.clone();
        async move {
            use http_body_util::BodyExt;
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let call: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let text = String::from_utf8_lossy(&body).to_lowercase();
            if text.contains("\"eth_call\"") && text.contains(&multicall) {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            if text.contains("\"eth_call\"") {
                // Slow simulations, so that payments sent at once overlap however the machine schedules them:
                // a lone one is simulated by its request, and only those that find others in flight share.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            if call["method"] == "eth_getTransactionReceipt" && withholding.load(Ordering::SeqCst) {
                withheld.fetch_add(1, Ordering::SeqCst);
                let pending = serde_json::json!({ "jsonrpc": "2.0", "id": call["id"], "result": null });
                return http::Response::new(x402_gateway::proxy::body::full(pending.to_string()));
            }
            let forward = Request::post(node).header("content-type", "application/json").body(Full::new(body));
            let answer = send(&client(), forward.unwrap()).await;
            http::Response::new(x402_gateway::proxy::body::full(answer.body))
        }
    })
    .await;
    Relay { upstream, multicall_calls, withholding, withheld }
}

#[tokio::test]
async fn one_shared_simulation_judges_each_call_alone() {
    let Some(chain) = Chain::shared().await else { return };
    let multicall = chain.deploy("Multicall").await;
    let challenge = serde_json::json!({
        "network": format!("eip155:{}", common::chain::CHAIN_ID), "asset": chain.token.to_string(),
        "payTo": PAY_TO, "amount": PRICE.to_string(), "maxTimeoutSeconds": 300,
        "extra": { "name": "USD Coin", "version": "2" },
    });
    let buyers = funded_buyers(&chain, 2).await;
    let broke = PrivateKeySigner::random();
    let call = |buyer: &PrivateKeySigner| {
        let payload = Authorization::for_offer(buyer.address(), &challenge).sign(buyer);
        (chain.token, common::chain::transfer_call(&payload).abi_encode().into())
    };
    // The last is a second authorization from a buyer funded for one: the calls run in order, so the first
    // one spends the balance and the second is refused.
    let calls = vec![call(&buyers[0]), call(&broke), call(&buyers[1]), call(&buyers[0])];
    let settler = chain.deployer;
    let verdicts = x402_gateway::chain::would_each_succeed(&chain.provider, settler, multicall, calls.clone()).await;
    assert_eq!(verdicts.unwrap(), [true, false, true, false]);
    assert_eq!(chain.balance(buyers[0].address()).await, U256::from(PRICE), "a simulation moves nothing");

    // Without a contract at the multicall address, nobody can say: never a pass.
    let nowhere = PAY_TO.parse().unwrap();
    let verdicts = x402_gateway::chain::would_each_succeed(&chain.provider, settler, nowhere, calls).await;
    assert!(verdicts.is_err(), "{verdicts:?}");
}

#[tokio::test]
async fn batching_settings_are_checked_at_start() {
    let upstream = "http://127.0.0.1:9";
    let check = |batch: &[(&str, i64)]| {
        let toml = GatewayToml::new()
            .listen()
            .upstream("api", upstream)
            .payment(batching(Payment::usdc().facilitator("http://127.0.0.1:9"), batch))
            .route(Route::paid("/paid", "api", "1"));
        x402_gateway::config::Config::parse(&toml.build(), "gateway.toml".as_ref(), ".".as_ref(), &|_| None)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert!(check(&[("settle_batch_max", 100)]).is_ok());
    let alone = check(&[("settle_batch_window_ms", 50)]).unwrap_err();
    assert!(alone.contains("payment.settle_batch_window_ms") && alone.contains("settle_batch_max"), "{alone}");
    let huge = check(&[("settle_batch_max", 100_000)]).unwrap_err();
    assert!(huge.contains("payment.settle_batch_max"), "{huge}");
    let slow = check(&[("settle_batch_max", 10), ("settle_batch_window_ms", 5000)]);
    assert!(slow.unwrap_err().contains("payment.settle_batch_window_ms"));
    let zero = check(&[("settle_batch_max", 0)]).unwrap_err();
    assert!(zero.contains("payment.settle_batch_max"), "{zero}");
}

#[tokio::test]
async fn readiness_requires_the_multicall_contract_when_batching() {
    let Some(chain) = Chain::shared().await else { return };
    let upstream = spawn_echo("api").await;
    let batched = [("settle_batch_max", 5)];
    let nowhere: Address = PAY_TO.parse().unwrap();
    let gateway = start_gateway(&toml(&upstream, chain.network().multicall(nowhere), &batched)).await;
    let readyz = |gateway: &Gateway| format!("http://{}/readyz", gateway.admin.expect("admin listener"));
    let unready = get(&readyz(&gateway)).await;
    assert_eq!(unready.status, StatusCode::SERVICE_UNAVAILABLE, "{}", unready.text());
    assert!(unready.text().contains("no contract at the multicall address"), "{}", unready.text());

    let multicall = chain.deploy("Multicall").await;
    let gateway = start_gateway(&toml(&upstream, chain.network().multicall(multicall), &batched)).await;
    let ready = get(&readyz(&gateway)).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_alone_in_its_window_goes_straight_to_the_token() {
    let Some(chain) = Chain::shared().await else { return };
    let multicall = chain.deploy("Multicall").await;
    let upstream = spawn_echo("api").await;
    let batched = [("settle_batch_max", 5)];
    let gateway = start_gateway(&toml(&upstream, chain.network().multicall(multicall), &batched)).await;
    let buyer = funded_buyers(&chain, 1).await.remove(0);
    let answer = pay_all(&gateway, vec![payment(&gateway, &buyer).await]).await.remove(0);
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let receipt = chain.provider.get_transaction_receipt(transaction(&answer)).await.unwrap().expect("mined");
    assert_eq!(receipt.to, Some(chain.token), "no multicall for a batch of one");
    assert_eq!(chain.balance(buyer.address()).await, U256::ZERO);
}
