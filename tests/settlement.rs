//! Settlement on a real local chain (anvil + TestUSDC): the buyer pays only for what is delivered, and a
//! payment is never taken twice.

mod common;

use alloy::primitives::{Address, B256, U256};
use alloy::providers::Provider;
use alloy::signers::local::PrivateKeySigner;
use bytes::Bytes;
use common::chain::Chain;
use common::config::{GatewayToml, Payment, Route};
use common::pay::{self, Authorization};
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use x402_gateway::proxy::body::full;

const PRICE: u64 = 1000;

/// `/paid` at `PRICE`, settled `settle` the answer on `chain`.
fn toml(upstream: &Upstream, chain: &Chain, settle: &str) -> GatewayToml {
    GatewayToml::new()
        .listen()
        .upstream("api", &upstream.url())
        .payment(Payment::usdc().set("settle", settle))
        .route(Route::paid("/paid", "api", &PRICE.to_string()))
        .network(chain.network())
}

struct Market {
    chain: Chain,
    upstream: Upstream,
    gateway: Gateway,
}

/// `None` when the test skips for want of anvil.
async fn market(settle: &str, upstream: Upstream) -> Option<Market> {
    let chain = Chain::shared().await?;
    let gateway = start_gateway(&toml(&upstream, &chain, settle).build()).await;
    Some(Market { chain, upstream, gateway })
}

impl Market {
    async fn buyer(&self, funds: u64) -> PrivateKeySigner {
        let buyer = PrivateKeySigner::random();
        if funds > 0 {
            self.chain.mint(buyer.address(), funds).await;
        }
        buyer
    }

    /// A signed `PAYMENT-SIGNATURE` for `/paid`, built from the gateway's own challenge.
    async fn payment(&self, buyer: &PrivateKeySigner) -> String {
        let answer = get(&self.gateway.url("/paid")).await;
        let challenge = pay::decode_header(&answer.headers["payment-required"]);
        let accepted = &challenge["accepts"][0];
        let auth = Authorization::for_offer(buyer.address(), accepted);
        pay::v2_header(&challenge["resource"], accepted, auth.sign(buyer))
    }

    async fn pay(&self, header: &str) -> Answer {
        let request =
            Request::get(self.gateway.url("/paid")).header("payment-signature", header).body(Full::default()).unwrap();
        send(&client(), request).await
    }

    async fn payee_balance(&self) -> U256 {
        self.chain.balance(PAY_TO.parse().unwrap()).await
    }

    /// Asserts the receipt in `PAYMENT-RESPONSE` is a success whose transaction succeeded on chain.
    async fn assert_settled(&self, answer: &Answer, payer: Address) -> B256 {
        let receipt = pay::decode_header(&answer.headers["payment-response"]);
        assert_eq!(receipt["success"], true, "{receipt}");
        assert_eq!(receipt["network"], "eip155:84532");
        assert_eq!(receipt["payer"], payer.to_string());
        let hash: B256 = receipt["transaction"].as_str().unwrap().parse().unwrap();
        let mined = self.chain.provider.get_transaction_receipt(hash).await.unwrap().expect("the transaction is mined");
        assert!(mined.status(), "the settlement transaction succeeded");
        hash
    }
}

#[tokio::test]
async fn a_paid_call_moves_exactly_the_price_on_chain() {
    let Some(m) = market("after", spawn_echo("api").await).await else { return };
    let buyer = m.buyer(5_000).await;
    let answer = m.pay(&m.payment(&buyer).await).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["upstream"], "api", "the upstream's answer is delivered");
    m.assert_settled(&answer, buyer.address()).await;
    assert_eq!(m.chain.balance(buyer.address()).await, U256::from(5_000 - PRICE));
    assert_eq!(m.payee_balance().await, U256::from(PRICE));
    assert!(answer.headers["access-control-expose-headers"].to_str().unwrap().contains("PAYMENT-RESPONSE"));
}

#[tokio::test]
async fn a_hundred_concurrent_payments_all_settle() {
    let Some(m) = market("after", spawn_echo("api").await).await else { return };
    let mut headers = Vec::new();
    for _ in 0..100 {
        let buyer = m.buyer(PRICE).await;
        headers.push((buyer.address(), m.payment(&buyer).await));
    }
    let calls: Vec<_> = headers
        .into_iter()
        .map(|(payer, header)| {
            let url = m.gateway.url("/paid");
            tokio::spawn(async move {
                let request = Request::get(url).header("payment-signature", header).body(Full::default()).unwrap();
                (payer, send(&client(), request).await)
            })
        })
        .collect();
    let mut hashes = std::collections::HashSet::new();
    for call in calls {
        let (payer, answer) = call.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        hashes.insert(m.assert_settled(&answer, payer).await);
    }
    assert_eq!(hashes.len(), 100, "one transaction per payment");
    assert_eq!(m.payee_balance().await, U256::from(100 * PRICE));
}

#[tokio::test]
async fn a_retry_after_success_gets_the_same_answer_and_transfers_once() {
    let Some(m) = market("after", spawn_echo("api").await).await else { return };
    let buyer = m.buyer(5_000).await;
    let header = m.payment(&buyer).await;
    let first = m.pay(&header).await;
    assert_eq!(first.status, StatusCode::OK);
    let again = m.pay(&header).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.headers["x402-replayed"], "true");
    assert_eq!(again.body, first.body, "the original paid answer");
    assert_eq!(again.headers["payment-response"], first.headers["payment-response"], "with its receipt");
    assert_eq!(m.upstream.hits(), 1);
    assert_eq!(m.payee_balance().await, U256::from(PRICE));
}

#[tokio::test]
async fn a_failed_answer_is_not_charged_and_the_authorization_can_be_retried() {
    let failing = Arc::new(AtomicBool::new(true));
    let switch = failing.clone();
    let upstream = spawn_upstream(move |_req| {
        let failing = switch.load(Ordering::SeqCst);
        async move {
            let mut response = Response::new(full(if failing { "boom" } else { "fine" }));
            if failing {
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            response
        }
    })
    .await;
    let Some(m) = market("after", upstream).await else { return };
    let buyer = m.buyer(5_000).await;
    let header = m.payment(&buyer).await;
    let failed = m.pay(&header).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!failed.headers.contains_key("payment-response"), "nothing was settled");
    assert_eq!(m.payee_balance().await, U256::ZERO);

    failing.store(false, Ordering::SeqCst);
    let retried = m.pay(&header).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.text());
    assert_eq!(retried.text(), "fine");
    m.assert_settled(&retried, buyer.address()).await;
    assert_eq!(m.payee_balance().await, U256::from(PRICE));
}

#[tokio::test]
async fn a_payer_without_balance_is_refused_before_the_upstream() {
    let Some(m) = market("after", spawn_echo("api").await).await else { return };
    let broke = m.buyer(PRICE - 1).await;
    let answer = m.pay(&m.payment(&broke).await).await;
    assert_eq!(answer.status, StatusCode::PAYMENT_REQUIRED);
    let challenge = pay::decode_header(&answer.headers["payment-required"]);
    assert_eq!(challenge["error"], "invalid_exact_evm_insufficient_balance");
    assert_eq!(m.upstream.hits(), 0);
}

#[tokio::test]
async fn a_failed_settlement_withholds_the_answer_and_the_queue_goes_on() {
    // One buyer signs two authorizations but holds the price once. Both verify (each alone would settle);
    // the upstream waits until both calls reached it; then one settlement succeeds and the other reverts.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let upstream = spawn_upstream(move |_req| {
        let barrier = barrier.clone();
        async move {
            barrier.wait().await;
            Response::new(full("secret answer"))
        }
    })
    .await;
    let Some(m) = market("after", upstream).await else { return };
    let buyer = m.buyer(PRICE).await;
    let (first, second) = (m.payment(&buyer).await, m.payment(&buyer).await);
    let (a, b) = tokio::join!(m.pay(&first), m.pay(&second));
    let (won, lost) = if a.status == StatusCode::OK { (a, b) } else { (b, a) };
    assert_eq!(won.status, StatusCode::OK, "{}", won.text());
    assert_eq!(lost.status, StatusCode::PAYMENT_REQUIRED, "{}", lost.text());
    assert!(!lost.text().contains("secret answer"), "the unpaid answer was withheld");
    let receipt = pay::decode_header(&lost.headers["payment-response"]);
    assert_eq!(receipt["success"], false);
    assert_eq!(receipt["errorReason"], "invalid_exact_evm_transaction_failed");
    assert_eq!(m.payee_balance().await, U256::from(PRICE));

    // The reverted transaction used a nonce of the settler's; later settlements are not stuck behind it.
    let other = m.buyer(PRICE).await;
    let later = tokio::time::timeout(Duration::from_secs(20), async {
        let header = m.payment(&other).await;
        // The upstream's barrier needs two callers: the second is another paying buyer.
        let (paid, _) = tokio::join!(m.pay(&header), async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            m.pay(&m.payment(&m.buyer(PRICE).await).await).await
        });
        paid
    })
    .await
    .expect("a later payment settles");
    assert_eq!(later.status, StatusCode::OK, "{}", later.text());
    assert_eq!(m.payee_balance().await, U256::from(3 * PRICE));
}

#[tokio::test]
async fn settle_before_streams_the_answer_with_its_receipt() {
    let (release_tx, release_rx) = tokio::sync::mpsc::channel::<()>(1);
    let release_rx = Arc::new(tokio::sync::Mutex::new(release_rx));
    let upstream = spawn_upstream(move |_req| {
        let release_rx = release_rx.clone();
        async move {
            let (mut tx, body) = Channel::<Bytes, Infallible>::new(4);
            tokio::spawn(async move {
                let _ = tx.send_data(Bytes::from_static(b"data: one\n\n")).await;
                let _ = release_rx.lock().await.recv().await;
                let _ = tx.send_data(Bytes::from_static(b"data: two\n\n")).await;
            });
            let mut response = Response::new(body.map_err(|never| match never {}).boxed_unsync());
            response.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            response
        }
    })
    .await;
    let Some(m) = market("before", upstream).await else { return };
    let buyer = m.buyer(5_000).await;
    let request = Request::get(m.gateway.url("/paid"))
        .header("payment-signature", m.payment(&buyer).await)
        .body(Full::default())
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let receipt = pay::decode_header(&response.headers()["payment-response"]);
    assert_eq!(receipt["success"], true);
    // Settled before the first byte: the payee is paid while the stream is still open.
    assert_eq!(m.payee_balance().await, U256::from(PRICE));
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first event before the second is sent");
    assert_eq!(first.unwrap().unwrap().into_data().unwrap(), Bytes::from_static(b"data: one\n\n"));
    release_tx.send(()).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), body.frame()).await.unwrap();
    assert_eq!(second.unwrap().unwrap().into_data().unwrap(), Bytes::from_static(b"data: two\n\n"));
}

#[tokio::test]
async fn rpc_down_makes_paid_routes_503_and_free_routes_keep_working() {
    let upstream = spawn_echo("api").await;
    let Some(chain) = Chain::shared().await else { return };
    let dead_rpc = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let toml =
        toml(&upstream, &chain, "after").network(chain.network().rpc_url(&dead_rpc)).route(Route::free("/free", "api"));
    let gateway = start_gateway(&toml.build()).await;
    let buyer = PrivateKeySigner::random();
    let challenge = pay::decode_header(&get(&gateway.url("/paid")).await.headers["payment-required"]);
    let auth = Authorization::for_offer(buyer.address(), &challenge["accepts"][0]);
    let header = pay::v2_header(&challenge["resource"], &challenge["accepts"][0], auth.sign(&buyer));
    let request = Request::get(gateway.url("/paid")).header("payment-signature", header).body(Full::default()).unwrap();
    let answer = send(&client(), request).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{}", answer.text());
    assert_eq!(answer.json()["error"], "facilitator_unavailable");
    assert!(!answer.text().contains(&dead_rpc[7..]), "the RPC address is not revealed");
    assert_eq!(get(&gateway.url("/free")).await.status, StatusCode::OK);
    assert_eq!(upstream.hits(), 1, "only the free call reached the upstream");
}

#[tokio::test]
async fn a_paid_answer_is_private_and_a_failed_settlement_is_not_stored() {
    // As in the failed-settlement test: two authorizations of one buyer who holds the price once both
    // verify before either settles, so one answer is paid and the other's settlement fails.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let upstream = spawn_upstream(move |_req| {
        let barrier = barrier.clone();
        async move {
            barrier.wait().await;
            let mut response = Response::new(full("paid answer"));
            response.headers_mut().insert("cache-control", "public, max-age=60".parse().unwrap());
            response
        }
    })
    .await;
    let Some(m) = market("after", upstream).await else { return };
    let buyer = m.buyer(PRICE).await;
    let (first, second) = (m.payment(&buyer).await, m.payment(&buyer).await);
    let (a, b) = tokio::join!(m.pay(&first), m.pay(&second));
    let ((won, won_header), lost) = if a.status == StatusCode::OK { ((a, &first), b) } else { ((b, &second), a) };
    assert_eq!(won.status, StatusCode::OK, "{}", won.text());
    assert_eq!(won.headers["cache-control"], "private, max-age=60", "no shared cache keeps a buyer's answer");
    assert_eq!(lost.status, StatusCode::PAYMENT_REQUIRED, "{}", lost.text());
    assert_eq!(lost.headers["cache-control"], "no-store");
    // The retry of the paid one is the kept answer, private too.
    let again = m.pay(won_header).await;
    assert_eq!((again.status, &again.headers["cache-control"]), (StatusCode::OK, &won.headers["cache-control"]));
}
