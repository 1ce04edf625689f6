//! The payment ledger: a row per payment in the right state, revenue equal to what moved on chain, settlement
//! timeouts resolved by reconciliation, and the `ledger` commands.

mod common;

use alloy::primitives::U256;
use alloy::providers::Provider;
use alloy::signers::local::PrivateKeySigner;
use common::chain::Chain;
use common::config::{GatewayToml, Payment, Route};
use common::pay::{self, Authorization};
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use std::process::Command;
use std::time::Duration;
use x402_gateway::config::Config;
use x402_gateway::ledger::Row;
use x402_gateway::proxy::body::full;

/// An upstream that fails (500) on any path containing `fail`.
async fn fragile_upstream() -> Upstream {
    spawn_upstream(|request: Request<hyper::body::Incoming>| async move {
        let fails = request.uri().path().contains("fail");
        let mut response = Response::new(full(if fails { "broken" } else { "the goods" }));
        if fails {
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        }
        response
    })
    .await
}

/// `/goods`, `/fail-after` and `/fail-before` (settled before the answer), each at 1000, on `chain`.
fn toml(upstream: &Upstream, chain: &Chain) -> GatewayToml {
    GatewayToml::new()
        .listen()
        .upstream("api", &upstream.url())
        .payment(Payment::usdc())
        .route(Route::paid("/goods", "api", "1000"))
        .route(Route::paid("/fail-after", "api", "1000"))
        .route(Route::paid("/fail-before", "api", "1000").settle("before"))
        .network(chain.network())
}

async fn payment(gateway: &Gateway, path: &str, buyer: &PrivateKeySigner) -> String {
    let challenge = pay::decode_header(&get(&gateway.url(path)).await.headers["payment-required"]);
    let offer = &challenge["accepts"][0];
    pay::v2_header(&challenge["resource"], offer, Authorization::for_offer(buyer.address(), offer).sign(buyer))
}

async fn pay_with(gateway: &Gateway, path: &str, header: &str) -> Answer {
    send(&client(), Request::get(gateway.url(path)).header("payment-signature", header).body(Full::default()).unwrap())
        .await
}

async fn row_of(gateway: &Gateway, payer: alloy::primitives::Address) -> Row {
    let rows = gateway.pipeline.ledger().list(None, None, Some(payer.to_string()), 10).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows.into_iter().next().unwrap()
}

/// Waits (bounded) for a row to reach `state` and `served`.
async fn row_when(gateway: &Gateway, payer: alloy::primitives::Address, state: &str, served: bool) -> Row {
    for _ in 0..100 {
        let row = row_of(gateway, payer).await;
        if row.state == state && row.served == served {
            return row;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("row never reached {state}/{served}: {:?}", row_of(gateway, payer).await);
}

fn ledger_command(gateway: &Gateway, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_x402-gateway"))
        .args(["ledger", "--config"])
        .arg(gateway.dir.join("gateway.toml"))
        .args(args)
        .output()
        .expect("the binary runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn every_payment_has_a_row_in_the_right_state_and_revenue_matches_the_chain() {
    let Some(chain) = Chain::shared().await else { return };
    let gateway = start_gateway(&toml(&fragile_upstream().await, &chain).build()).await;
    let buyers: Vec<PrivateKeySigner> = (0..4).map(|_| PrivateKeySigner::random()).collect();
    for buyer in &buyers {
        chain.mint(buyer.address(), 10_000).await;
    }

    let delivered = pay_with(&gateway, "/goods", &payment(&gateway, "/goods", &buyers[0]).await).await;
    assert_eq!(delivered.status, StatusCode::OK);
    let receipt = pay::decode_header(&delivered.headers["payment-response"]);
    let row = row_when(&gateway, buyers[0].address(), "settled", true).await;
    assert_eq!(row.transaction.as_deref(), receipt["transaction"].as_str());
    assert_eq!(
        (row.amount.to_string().as_str(), row.route.as_str(), row.settle_mode.as_str()),
        ("1000", "/goods", "after")
    );
    assert_eq!(row.upstream_status, Some(200));

    let second = pay_with(&gateway, "/goods", &payment(&gateway, "/goods", &buyers[1]).await).await;
    assert_eq!(second.status, StatusCode::OK);

    // settle = "after" and the answer failed: nothing charged, the row released.
    let failed = pay_with(&gateway, "/fail-after", &payment(&gateway, "/fail-after", &buyers[2]).await).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    let row = row_when(&gateway, buyers[2].address(), "released", false).await;
    assert_eq!((row.upstream_status, row.transaction), (Some(500), None));

    // settle = "before" and the answer failed after the payment settled: marked for refund.
    let charged = pay_with(&gateway, "/fail-before", &payment(&gateway, "/fail-before", &buyers[3]).await).await;
    assert_eq!(charged.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(pay::decode_header(&charged.headers["payment-response"])["success"], true, "the buyer gets its receipt");
    let row = row_when(&gateway, buyers[3].address(), "refund_needed", false).await;
    assert!(row.failure.as_deref().unwrap_or("").contains("500"), "{row:?}");

    // Revenue (by the library and by the command) equals what moved on chain to the payee.
    let on_chain = chain.balance(PAY_TO.parse().unwrap()).await;
    assert_eq!(on_chain, U256::from(3000));
    let revenue = gateway.pipeline.ledger().revenue().await.unwrap();
    let total: U256 = revenue.iter().map(|r| r.amount.parse::<U256>().unwrap()).sum();
    assert_eq!(total, on_chain);
    let table = ledger_command(&gateway, &["revenue"]);
    assert!(table.contains("/goods") && table.contains("2000") && table.contains("/fail-before"), "{table}");

    let listed = ledger_command(&gateway, &["list", "--state", "released"]);
    assert_eq!(listed.lines().count(), 2, "a header and the released row: {listed}");
    let shown: serde_json::Value =
        serde_json::from_str(&ledger_command(&gateway, &["show", &row.id.to_string()])).unwrap();
    assert_eq!(shown["state"], "refund_needed");
}

#[tokio::test]
async fn a_settlement_timeout_stays_pending_until_reconciliation_and_the_retry_delivers() {
    // An anvil of its own: it stops mining.
    let Some(chain) = Chain::own().await else { return };
    let toml = toml(&fragile_upstream().await, &chain).payment(Payment::usdc().set("settle_timeout_secs", 1));
    let gateway = start_gateway(&toml.build()).await;
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), 10_000).await;
    let header = payment(&gateway, "/goods", &buyer).await;

    // The chain stops mining: the settlement is broadcast but not confirmed in time.
    let _: serde_json::Value = chain.provider.raw_request("evm_setAutomine".into(), (false,)).await.unwrap();
    let pending = pay_with(&gateway, "/goods", &header).await;
    assert_eq!(pending.status, StatusCode::PAYMENT_REQUIRED);
    assert!(!pending.text().contains("the goods"), "withheld while unpaid");
    let receipt = pay::decode_header(&pending.headers["payment-response"]);
    assert_eq!(receipt["errorReason"], "settlement_pending");
    let transaction = receipt["transaction"].as_str().unwrap().to_string();
    assert_eq!(transaction.len(), 66);
    let row = row_of(&gateway, buyer.address()).await;
    assert_eq!((row.state.as_str(), row.transaction.as_deref()), ("settling", Some(transaction.as_str())));
    // Meanwhile a retry is told it is still pending, and nothing is charged twice.
    let retry = pay_with(&gateway, "/goods", &header).await;
    assert_eq!(pay::decode_header(&retry.headers["payment-response"])["errorReason"], "settlement_pending");

    // Mining resumes; reconciliation finds the transfer on chain.
    let _: serde_json::Value = chain.provider.raw_request("evm_setAutomine".into(), (true,)).await.unwrap();
    let _: serde_json::Value = chain.provider.raw_request("evm_mine".into(), ()).await.unwrap();
    let report = gateway.pipeline.reconcile(x402_gateway::replay::unix_now() + 1).await.unwrap();
    assert_eq!((report.settled, report.refunds, report.still_pending), (1, 1, 0), "{report:?}");
    let row = row_of(&gateway, buyer.address()).await;
    assert_eq!((row.state.as_str(), row.transaction.as_deref()), ("refund_needed", Some(transaction.as_str())));

    // The buyer retries with the same authorization: it gets the answer it paid for, once.
    let delivered = pay_with(&gateway, "/goods", &header).await;
    assert_eq!(delivered.status, StatusCode::OK);
    assert_eq!(delivered.text(), "the goods");
    assert_eq!(pay::decode_header(&delivered.headers["payment-response"])["transaction"], transaction.as_str());
    row_when(&gateway, buyer.address(), "settled", true).await;
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await, U256::from(1000));
}

#[tokio::test]
async fn a_retry_whose_answer_is_too_big_to_keep_gets_a_409_with_the_transaction() {
    let Some(chain) = Chain::shared().await else { return };
    let toml = toml(&fragile_upstream().await, &chain).ledger("answers_max_body_bytes", 4);
    let gateway = start_gateway(&toml.build()).await;
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), 10_000).await;
    let header = payment(&gateway, "/goods", &buyer).await;
    let first = pay_with(&gateway, "/goods", &header).await;
    assert_eq!(first.status, StatusCode::OK);
    let transaction = pay::decode_header(&first.headers["payment-response"])["transaction"].clone();
    let retry = pay_with(&gateway, "/goods", &header).await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(retry.json()["error"], "payment_already_used");
    assert_eq!(retry.json()["transaction"], transaction);
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await, U256::from(1000), "never a second charge");
}

#[tokio::test]
async fn a_payment_identifier_is_the_idempotency_key() {
    let Some(chain) = Chain::shared().await else { return };
    let gateway = start_gateway(&toml(&fragile_upstream().await, &chain).build()).await;
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), 10_000).await;
    let challenge = pay::decode_header(&get(&gateway.url("/goods")).await.headers["payment-required"]);
    let offer = &challenge["accepts"][0];
    let with_id = |id: &str| {
        let payload = Authorization::for_offer(buyer.address(), offer).sign(&buyer);
        let body = serde_json::json!({
            "x402Version": 2, "resource": challenge["resource"], "accepted": offer, "payload": payload,
            "extensions": { "payment-identifier": { "info": { "id": id } } }
        });
        pay::encode(&body)
    };
    let first = with_id("pay_0123456789abcdef");
    assert_eq!(pay_with(&gateway, "/goods", &first).await.status, StatusCode::OK);
    // The same id and payment again: the cached answer.
    let again = pay_with(&gateway, "/goods", &first).await;
    assert_eq!((again.status, again.text().as_str()), (StatusCode::OK, "the goods"));
    assert_eq!(again.headers["x402-replayed"], "true");
    // The same id with another authorization: refused, and nothing charged for it.
    let reused = pay_with(&gateway, "/goods", &with_id("pay_0123456789abcdef")).await;
    assert_eq!(reused.status, StatusCode::CONFLICT);
    assert_eq!(reused.json()["error"], "payment_identifier_reused");
    // A malformed id is a bad request.
    let malformed = pay_with(&gateway, "/goods", &with_id("short")).await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await, U256::from(1000));
}

/// A JSON-RPC relay to the chain, at `/rpc/SECRET-RPC-KEY` as a provider's URL would carry its key, that
/// refuses `eth_getLogs` over more than `max_range` blocks as providers do (0: refuses every one).
async fn log_capped_relay(chain: &Chain, max_range: u64) -> String {
    let node = chain.rpc_url.clone();
    let relay = spawn_upstream(move |request: Request<hyper::body::Incoming>| {
        let node = node.clone();
        async move {
            use http_body_util::BodyExt;
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let call: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if call["method"] == "eth_getLogs" {
                let block = |name: &str| {
                    let hex = call["params"][0][name].as_str().unwrap_or("0x0").trim_start_matches("0x");
                    u64::from_str_radix(hex, 16).unwrap_or(0)
                };
                let range = block("toBlock").saturating_sub(block("fromBlock")) + 1;
                if max_range == 0 || range > max_range {
                    let refusal = serde_json::json!({
                        "jsonrpc": "2.0", "id": call["id"],
                        "error": { "code": -32005, "message": format!("query exceeds max block range {max_range}") },
                    });
                    return Response::new(full(refusal.to_string()));
                }
            }
            let forward = Request::post(node).header("content-type", "application/json").body(Full::new(body));
            Response::new(full(send(&client(), forward.unwrap()).await.body))
        }
    })
    .await;
    format!("{}/rpc/SECRET-RPC-KEY", relay.url())
}

/// A paid-and-served payment left `settling` without a transaction (a remote facilitator that answered none),
/// whose authorization someone else landed on chain, `blocks_after` blocks ago. Returns its row id and the
/// transaction that landed it.
async fn settled_without_a_hash(gateway: &Gateway, chain: &Chain, blocks_after: u64) -> (i64, String) {
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), 10_000).await;
    let offer = serde_json::json!({
        "network": format!("eip155:{}", common::chain::CHAIN_ID), "asset": chain.token.to_string(),
        "payTo": PAY_TO, "amount": "1000", "maxTimeoutSeconds": 300,
        "extra": { "name": "USD Coin", "version": "2" },
    });
    let authorization = Authorization::for_offer(buyer.address(), &offer);
    let ledger = gateway.pipeline.ledger();
    let id = ledger
        .record_verified(x402_gateway::ledger::NewPayment {
            route: "/goods".into(),
            payer: buyer.address(),
            payee: PAY_TO.parse().unwrap(),
            network: offer["network"].as_str().unwrap().into(),
            chain_id: common::chain::CHAIN_ID,
            asset: chain.token,
            amount: U256::from(1000),
            nonce: authorization.message.nonce,
            valid_before: authorization.message.validBefore.to::<u64>(),
            settle_mode: "after",
            facilitator: "http://127.0.0.1:9".into(),
            scheme: "exact",
        })
        .await
        .unwrap()
        .unwrap();
    ledger.settling(id, Some(200)).await.unwrap();
    ledger.served(id).await.unwrap();
    let transaction = chain.land(&authorization.sign(&buyer)).await;
    chain.mine(blocks_after).await;
    (id, transaction.to_string())
}

#[tokio::test]
async fn reconciliation_pages_its_event_search_and_finds_a_transfer_many_chunks_back() {
    // An anvil of its own: it mines blocks to put the transfer a known depth back.
    let Some(chain) = Chain::own().await else { return };
    let relay = log_capped_relay(&chain, 500).await;
    let through_relay = toml(&fragile_upstream().await, &chain).network(chain.network().rpc_url(&relay));
    let gateway = start_gateway(&through_relay.clone().ledger("reconcile_log_chunk_blocks", 500).build()).await;
    // The transfer is four chunks deep: only a search that goes back chunk by chunk reaches it.
    let (id, transaction) = settled_without_a_hash(&gateway, &chain, 2_000).await;

    let report = gateway.pipeline.reconcile(x402_gateway::replay::unix_now() + 1).await.unwrap();
    assert_eq!((report.settled, report.unreachable), (1, 0), "{report:?}");
    let row = gateway.pipeline.ledger().get(id).await.unwrap().unwrap();
    assert_eq!((row.state.as_str(), row.transaction), ("settled", Some(transaction)));

    let zero = through_relay.ledger("reconcile_log_chunk_blocks", 0).build();
    let err = Config::parse(&zero, "g.toml".as_ref(), ".".as_ref(), &|_| None).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("ledger.reconcile_log_chunk_blocks") && err.contains("greater than zero"), "{err}");
}

/// Everything logged on this thread while it lives.
#[derive(Clone, Default)]
struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn a_node_that_fails_the_event_search_leaves_the_row_for_the_next_pass() {
    let log = CapturedLog::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    // An anvil of its own: it mines blocks.
    let Some(chain) = Chain::own().await else { return };
    let refusing = log_capped_relay(&chain, 0).await;
    let direct = toml(&fragile_upstream().await, &chain);
    let gateway = start_gateway(&direct.clone().network(chain.network().rpc_url(&refusing)).build()).await;
    let (id, transaction) = settled_without_a_hash(&gateway, &chain, 10).await;

    // The chain says the money moved, but not by which transaction: the row waits rather than guess.
    let report = gateway.pipeline.reconcile(x402_gateway::replay::unix_now() + 1).await.unwrap();
    assert_eq!((report.settled, report.unreachable), (0, 1), "{report:?}");
    let row = gateway.pipeline.ledger().get(id).await.unwrap().unwrap();
    assert_eq!((row.state.as_str(), row.transaction), ("settling", None));
    let logged = log.text();
    assert!(logged.contains("eth_getLogs") && logged.contains("max block range"), "the reason is logged: {logged}");
    assert!(!logged.contains("SECRET-RPC-KEY"), "the RPC URL is not logged: {logged}");

    // With a node that answers, the next pass settles it with its transaction.
    gateway.pipeline.reload(Config::parse(&direct.build(), "g.toml".as_ref(), ".".as_ref(), &|_| None).unwrap());
    let report = gateway.pipeline.reconcile(x402_gateway::replay::unix_now() + 1).await.unwrap();
    assert_eq!((report.settled, report.unreachable), (1, 0), "{report:?}");
    let row = gateway.pipeline.ledger().get(id).await.unwrap().unwrap();
    assert_eq!((row.state.as_str(), row.transaction), ("settled", Some(transaction)));
}

alloy::sol! {
    function approve(address spender, uint256 value) external returns (bool);

    /// The upto proxy's `settle`, as the facilitator named in the witness calls it.
    interface UptoProxy {
        struct TokenPermissions { address token; uint256 amount; }
        struct PermitTransferFrom { TokenPermissions permitted; uint256 nonce; uint256 deadline; }
        struct Witness { address to; address facilitator; uint256 validAfter; }
        function settle(PermitTransferFrom permit, uint256 amount, address owner, Witness witness, bytes signature) external;
    }
}

/// A buyer's signed `upto` permit of `ceiling` to `PAY_TO`, which only `facilitator` may settle.
struct UptoPermit {
    nonce: U256,
    deadline: u64,
    call: UptoProxy::settleCall,
}

impl UptoPermit {
    fn sign(
        chain: &Chain,
        buyer: &PrivateKeySigner,
        facilitator: alloy::primitives::Address,
        nonce: U256,
        deadline: u64,
    ) -> UptoPermit {
        use alloy::signers::SignerSync;
        use alloy::sol_types::SolStruct;
        use x402_proto::upto_evm::{PermitWitnessTransferFrom, TokenPermissions, Witness, UPTO_PROXY};
        let (ceiling, to) = (U256::from(5000), PAY_TO.parse().unwrap());
        let message = PermitWitnessTransferFrom {
            permitted: TokenPermissions { token: chain.token, amount: ceiling },
            spender: UPTO_PROXY,
            nonce,
            deadline: U256::from(deadline),
            witness: Witness { to, facilitator, validAfter: U256::ZERO },
        };
        let signature = buyer.sign_hash_sync(&message.eip712_signing_hash(&common::chain::permit2_domain())).unwrap();
        let call = UptoProxy::settleCall {
            permit: UptoProxy::PermitTransferFrom {
                permitted: UptoProxy::TokenPermissions { token: chain.token, amount: ceiling },
                nonce,
                deadline: U256::from(deadline),
            },
            amount: U256::ZERO,
            owner: buyer.address(),
            witness: UptoProxy::Witness { to, facilitator, validAfter: U256::ZERO },
            signature: signature.as_bytes().to_vec().into(),
        };
        UptoPermit { nonce, deadline, call }
    }

    /// The facilitator settles `amount` of it; returns the transaction and whether it succeeded. The gas is
    /// given, so that a transaction that reverts is still mined.
    async fn settle(&self, chain: &Chain, amount: u64) -> (String, bool) {
        use alloy::network::TransactionBuilder;
        use alloy::sol_types::SolCall;
        let call = UptoProxy::settleCall { amount: U256::from(amount), ..self.call.clone() };
        let tx = alloy::rpc::types::TransactionRequest::default()
            .from(self.call.witness.facilitator)
            .with_to(x402_proto::upto_evm::UPTO_PROXY)
            .with_input(call.abi_encode())
            .with_gas_limit(500_000);
        let receipt = chain.provider.send_transaction(tx).await.unwrap().get_receipt().await.unwrap();
        (receipt.transaction_hash.to_string(), receipt.status())
    }

    /// Its row as the gateway records an `upto` payment being settled: metered (`charged`, and the usage),
    /// `settling`, served, with `transaction` recorded or not.
    async fn row(
        &self,
        gateway: &Gateway,
        chain: &Chain,
        payer: &PrivateKeySigner,
        charged: Option<(u64, Option<(u64, u64)>)>,
        transaction: Option<String>,
    ) -> i64 {
        let ledger = gateway.pipeline.ledger();
        let id = ledger
            .record_verified(x402_gateway::ledger::NewPayment {
                route: "/chat".into(),
                payer: payer.address(),
                payee: PAY_TO.parse().unwrap(),
                network: format!("eip155:{}", common::chain::CHAIN_ID),
                chain_id: common::chain::CHAIN_ID,
                asset: chain.token,
                amount: U256::from(5000),
                nonce: alloy::primitives::B256::from(self.nonce),
                valid_before: self.deadline,
                settle_mode: "after",
                facilitator: "local".into(),
                scheme: "upto",
            })
            .await
            .unwrap()
            .unwrap();
        if let Some((charged, usage)) = charged {
            ledger.metered(id, U256::from(charged), usage).await.unwrap();
        }
        ledger.settling(id, Some(200)).await.unwrap();
        ledger.served(id).await.unwrap();
        if let Some(transaction) = transaction {
            ledger.pending(id, transaction).await.unwrap();
        }
        id
    }
}

#[tokio::test]
async fn upto_rows_are_reconciled_by_their_receipt_else_by_permit2s_nonce_bitmap() {
    let Some(chain) = Chain::shared_with_permit2().await else { return };
    let gateway = start_gateway(&toml(&fragile_upstream().await, &chain).build()).await;
    let buyer = PrivateKeySigner::random();
    chain.mint(buyer.address(), 100_000).await;
    // The buyer approves Permit2 once; the deployer (anvil signs for it) is the facilitator the permits name.
    let ether = U256::from(10u64).pow(U256::from(18u64));
    let _: serde_json::Value =
        chain.provider.raw_request("anvil_setBalance".into(), (buyer.address(), ether)).await.unwrap();
    let _: serde_json::Value =
        chain.provider.raw_request("anvil_impersonateAccount".into(), (buyer.address(),)).await.unwrap();
    let approval = {
        use alloy::network::TransactionBuilder;
        use alloy::sol_types::SolCall;
        let call = approveCall { spender: x402_proto::upto_evm::PERMIT2, value: U256::MAX }.abi_encode();
        let tx = alloy::rpc::types::TransactionRequest::default()
            .from(buyer.address())
            .with_to(chain.token)
            .with_input(call);
        let receipt = chain.provider.send_transaction(tx).await.unwrap().get_receipt().await.unwrap();
        assert!(receipt.status(), "approve");
        receipt.transaction_hash.to_string()
    };
    let now = x402_gateway::replay::unix_now();
    let (later, passed) = (now + 3000, now - 10);
    let permit = |nonce: U256, deadline: u64| UptoPermit::sign(&chain, &buyer, chain.deployer, nonce, deadline);

    // Settled by its recorded transaction, metered below its ceiling.
    let settled = permit(U256::from(1), later);
    let (transaction, ok) = settled.settle(&chain, 1234).await;
    assert!(ok);
    let by_receipt =
        settled.row(&gateway, &chain, &buyer, Some((1234, Some((100, 50)))), Some(transaction.clone())).await;
    // Its recorded transaction reverted (above the ceiling): nothing moved.
    let refused = permit(U256::from(2), later);
    let (reverted, ok) = refused.settle(&chain, 5001).await;
    assert!(!ok);
    let by_revert = refused.row(&gateway, &chain, &buyer, None, Some(reverted.clone())).await;
    // No transaction recorded: Permit2's bitmap decides, and the proxy call found by the token's transfer
    // names the transaction. Three nonces in one word of it, bits 3, 4 and 5.
    let word = U256::from(7) << 8;
    let spent = permit(word | U256::from(3), later);
    let (spent_by, ok) = spent.settle(&chain, 100).await;
    assert!(ok);
    let by_bitmap = spent.row(&gateway, &chain, &buyer, Some((100, None)), None).await;
    let waiting = permit(word | U256::from(4), later).row(&gateway, &chain, &buyer, None, None).await;
    let expired = permit(word | U256::from(5), passed).row(&gateway, &chain, &buyer, None, None).await;
    // A recorded transaction that succeeded without settling it (the approval): nothing moved.
    let elsewhere = permit(U256::from(4), later).row(&gateway, &chain, &buyer, None, Some(approval.clone())).await;
    // A recorded transaction the chain never saw, past the permit's deadline.
    let vanished = permit(U256::from(3), passed);
    let lost = vanished.row(&gateway, &chain, &buyer, None, Some(format!("0x{}", "ee".repeat(32)))).await;

    let report = gateway.pipeline.reconcile(x402_gateway::replay::unix_now() + 1).await.unwrap();
    assert_eq!((report.settled, report.failed, report.still_pending, report.refunds), (2, 4, 1, 0), "{report:?}");
    let pipeline = gateway.pipeline.clone();
    let row = |id| {
        let pipeline = pipeline.clone();
        async move { pipeline.ledger().get(id).await.unwrap().unwrap() }
    };
    let state = |row: &Row| (row.state.to_string(), row.transaction.clone());
    assert_eq!(state(&row(by_receipt).await), ("settled".into(), Some(transaction)));
    assert_eq!(state(&row(by_revert).await), ("failed".into(), Some(reverted)));
    // Found by its transaction, which the token's transfer to the payee leads to.
    assert_eq!(state(&row(by_bitmap).await), ("settled".into(), Some(spent_by)));
    assert_eq!(state(&row(elsewhere).await), ("failed".into(), Some(approval)));
    assert_eq!(row(waiting).await.state, "settling");
    assert_eq!(row(expired).await.state, "failed");
    assert_eq!(row(lost).await.state, "failed");
    assert_eq!(chain.balance(PAY_TO.parse().unwrap()).await, U256::from(1334));

    // Revenue is what was charged, not the ceilings signed; the commands show the scheme, charge and tokens.
    let revenue = gateway.pipeline.ledger().revenue().await.unwrap();
    assert_eq!(revenue.iter().map(|r| r.amount.as_str()).collect::<Vec<_>>(), ["1334"], "{revenue:?}");
    let table = ledger_command(&gateway, &["revenue"]);
    assert!(table.lines().any(|l| l.starts_with("/chat") && l.ends_with("  1334")), "{table}");
    let listed = ledger_command(&gateway, &["list", "--state", "settled"]);
    let header: Vec<&str> = listed.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header[4..9], ["SCHEME", "AMOUNT", "CHARGED", "TOKENS", "IN/OUT"], "{listed}");
    let line = listed.lines().find(|l| l.split_whitespace().next() == Some(&by_receipt.to_string())).unwrap();
    assert_eq!(line.split_whitespace().collect::<Vec<_>>()[4..8], ["upto", "5000", "1234", "100/50"], "{listed}");
    let shown: serde_json::Value =
        serde_json::from_str(&ledger_command(&gateway, &["show", &by_bitmap.to_string()])).unwrap();
    assert_eq!(
        (&shown["scheme"], &shown["amount"], &shown["charged"]),
        (&"upto".into(), &"5000".into(), &"100".into())
    );
    assert_eq!(
        (&shown["prompt_tokens"], &shown["completion_tokens"]),
        (&serde_json::Value::Null, &serde_json::Value::Null)
    );

    // The reverted permit's nonce is spent after all, by another transaction settling its charge. Its answer
    // had gone out (a stream): it is paid for, not owed back.
    let (late, ok) = refused.settle(&chain, 5000).await;
    assert!(ok);
    let report = gateway.pipeline.reconcile(x402_gateway::replay::unix_now() + 1).await.unwrap();
    assert_eq!((report.settled, report.refunds, report.still_pending), (1, 0, 1), "{report:?}");
    assert_eq!(state(&row(by_revert).await), ("settled".into(), Some(late)));
}
