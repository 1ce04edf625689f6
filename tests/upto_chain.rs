//! The `upto` scheme on a real chain: the real Permit2 and the repository's `x402UptoPermit2Proxy` at their
//! canonical addresses on anvil, Permit2 authorizations signed here with alloy, verified and settled by the
//! in-process settler (`LocalSettler::verify_upto` / `settle_upto`).

mod common;

use alloy::primitives::{keccak256, Address, Bytes, B256, U256};
use alloy::providers::Provider;
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::signers::SignerSync;
use alloy::sol;
use alloy::sol_types::{Eip712Domain, SolCall, SolError, SolStruct};
use common::chain::{self, Chain};
use common::pay::now;
use common::tools;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use x402_chain::options::{SettlementOptions, SettlerConfig};
use x402_gateway::ledger::{Ledger, NewPayment};
use x402_gateway::settlement::{BeforeBroadcast, LocalSettler, SettleFailure, VerifyFailure};
use x402_proto::upto_evm::{Eip2612Permit, PermitAuthorization, PERMIT2, UPTO_PROXY};
use x402_proto::Rejection;

sol! {
    /// Permit2's signed message with the `upto` witness (`specs/schemes/upto/scheme_upto_evm.md`): its EIP-712
    /// type is `PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256
    /// deadline,Witness witness)TokenPermissions(...)Witness(address to,address facilitator,uint256 validAfter)`.
    struct TokenPermissions {
        address token;
        uint256 amount;
    }
    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }
    struct PermitWitnessTransferFrom {
        TokenPermissions permitted;
        address spender;
        uint256 nonce;
        uint256 deadline;
        Witness witness;
    }
    /// EIP-2612, in the token's own domain.
    struct Permit {
        address owner;
        address spender;
        uint256 value;
        uint256 nonce;
        uint256 deadline;
    }

    function approve(address spender, uint256 value) external returns (bool);
    function allowance(address owner, address spender) external view returns (uint256);
    function nonces(address owner) external view returns (uint256);

    /// Permit2's way for an owner to spend its own nonces.
    interface Permit2Invalidation {
        function invalidateUnorderedNonces(uint256 wordPos, uint256 mask) external;
    }

    /// The proxy's entry point, called here by someone other than the settler.
    interface Proxy {
        struct PermitTransferFrom {
            TokenPermissions permitted;
            uint256 nonce;
            uint256 deadline;
        }
        function settle(PermitTransferFrom permit, uint256 amount, address owner, Witness witness, bytes signature) external;
        error UnauthorizedFacilitator();
    }
}

/// $0.50 in USDC's atomic units: the ceiling every authorization here signs.
const CEILING: u64 = 500_000;

/// A chain with Permit2 and the proxy, a settler on it, and a payee.
struct Upto {
    chain: Chain,
    settler: LocalSettler,
    settler_address: Address,
    pay_to: Address,
}

impl Upto {
    /// `None` when anvil or the Permit2 package is missing (the test is reported skipped).
    async fn start() -> Option<Upto> {
        let chain = Chain::shared_with_permit2().await?;
        let key = chain.settler();
        let settler_address = key.address();
        let config = SettlerConfig { rpc_url: chain.rpc_url.parse().unwrap(), key, multicall: Address::ZERO };
        let options = SettlementOptions {
            settle_timeout: Duration::from_secs(30),
            facilitator_timeout: Duration::from_secs(30),
            facilitator_max_concurrency: 32,
            settle_batch: None,
        };
        let provider = x402_gateway::chain::connect(&config.rpc_url, Duration::from_secs(10));
        let settler = LocalSettler::new(provider, &config, chain::CHAIN_ID, &options);
        Some(Upto { chain, settler, settler_address, pay_to: PrivateKeySigner::random().address() })
    }

    /// A buyer holding `balance`, with no ether and no Permit2 allowance.
    async fn buyer(&self, balance: u64) -> PrivateKeySigner {
        let buyer = PrivateKeySigner::random();
        self.chain.mint(buyer.address(), balance).await;
        buyer
    }

    /// The buyer's one-time `approve(Permit2, max)`, sent from its own account (anvil signs for it).
    async fn approve_permit2(&self, buyer: Address) {
        let rpc = &self.chain.provider;
        let _: serde_json::Value =
            rpc.raw_request("anvil_setBalance".into(), (buyer, U256::from(10u64).pow(U256::from(18)))).await.unwrap();
        let _: serde_json::Value = rpc.raw_request("anvil_impersonateAccount".into(), (buyer,)).await.unwrap();
        let input = approveCall { spender: PERMIT2, value: U256::MAX }.abi_encode();
        let tx = TransactionRequest::default().from(buyer).to(self.chain.token).input(Bytes::from(input).into());
        assert!(rpc.send_transaction(tx).await.unwrap().get_receipt().await.unwrap().status(), "approve");
    }

    /// A Permit2 authorization of the ceiling to `pay_to`, bound to `facilitator`, valid for five minutes.
    fn authorize(&self, buyer: &PrivateKeySigner, facilitator: Address) -> PermitAuthorization {
        self.authorize_nonce(buyer, facilitator, U256::from_be_bytes(common::pay::fresh_nonce().0))
    }

    /// The same, with its Permit2 `nonce` chosen.
    fn authorize_nonce(&self, buyer: &PrivateKeySigner, facilitator: Address, nonce: U256) -> PermitAuthorization {
        let (ceiling, deadline, valid_after) = (U256::from(CEILING), U256::from(now() + 300), U256::from(now() - 600));
        let message = PermitWitnessTransferFrom {
            permitted: TokenPermissions { token: self.chain.token, amount: ceiling },
            spender: UPTO_PROXY,
            nonce,
            deadline,
            witness: Witness { to: self.pay_to, facilitator, validAfter: valid_after },
        };
        let signature = buyer.sign_hash_sync(&message.eip712_signing_hash(&chain::permit2_domain())).unwrap();
        PermitAuthorization {
            from: buyer.address(),
            token: self.chain.token,
            ceiling,
            nonce,
            deadline,
            pay_to: self.pay_to,
            facilitator,
            valid_after,
            signature: signature.as_bytes().to_vec().into(),
            eip2612: None,
        }
    }

    /// The buyer's EIP-2612 permit of the ceiling to Permit2 (its first: token nonce 0).
    fn permit(&self, buyer: &PrivateKeySigner) -> Eip2612Permit {
        let (value, deadline) = (U256::from(CEILING), U256::from(now() + 300));
        let message = Permit { owner: buyer.address(), spender: PERMIT2, value, nonce: U256::ZERO, deadline };
        let domain = Eip712Domain::new(
            Some("USD Coin".into()),
            Some("2".into()),
            Some(U256::from(chain::CHAIN_ID)),
            Some(self.chain.token),
            None,
        );
        let signature = buyer.sign_hash_sync(&message.eip712_signing_hash(&domain)).unwrap();
        Eip2612Permit {
            value,
            deadline,
            v: 27 + u8::from(signature.v()),
            r: signature.r().into(),
            s: signature.s().into(),
        }
    }

    async fn view<C: SolCall>(&self, call: C) -> C::Return {
        x402_gateway::chain::view(&self.chain.provider, self.chain.token, call).await.unwrap()
    }

    async fn sent_by_settler(&self) -> u64 {
        self.chain.provider.get_transaction_count(self.settler_address).await.unwrap()
    }

    async fn receipt(&self, transaction: &str) -> TransactionReceipt {
        let hash: B256 = transaction.parse().unwrap();
        self.chain.provider.get_transaction_receipt(hash).await.unwrap().expect("mined")
    }
}

impl Upto {
    /// The buyer spends its own permit's nonce: Permit2's `invalidateUnorderedNonces` of its bit, sent from its
    /// account (anvil signs for it).
    async fn cancel(&self, auth: &PermitAuthorization) {
        let rpc = &self.chain.provider;
        let _: serde_json::Value = rpc
            .raw_request("anvil_setBalance".into(), (auth.from, U256::from(10u64).pow(U256::from(18))))
            .await
            .unwrap();
        let _: serde_json::Value = rpc.raw_request("anvil_impersonateAccount".into(), (auth.from,)).await.unwrap();
        let (word, bit) = (auth.nonce >> 8, U256::from(1) << (auth.nonce & U256::from(0xff)).to::<usize>());
        let input = Permit2Invalidation::invalidateUnorderedNoncesCall { wordPos: word, mask: bit }.abi_encode();
        let tx = TransactionRequest::default().from(auth.from).to(PERMIT2).input(Bytes::from(input).into());
        assert!(rpc.send_transaction(tx).await.unwrap().get_receipt().await.unwrap().status(), "invalidate");
    }

    /// A ledger row of `auth`'s stream, left `settling` with no transaction by a remote facilitator that never
    /// answered.
    async fn unanswered_row(&self, ledger: &Ledger, auth: &PermitAuthorization, charged: u64) -> i64 {
        let payment = NewPayment {
            route: "/v1/chat/completions".into(),
            payer: auth.from,
            payee: auth.pay_to,
            network: format!("eip155:{}", chain::CHAIN_ID),
            chain_id: chain::CHAIN_ID,
            asset: auth.token,
            amount: auth.ceiling,
            nonce: auth.nonce_key(),
            valid_before: auth.deadline_secs(),
            settle_mode: "after",
            facilitator: "http://127.0.0.1:9/".into(),
            scheme: "upto",
        };
        let id = ledger.record_verified(payment).await.unwrap().unwrap();
        ledger.metered(id, U256::from(charged), None).await.unwrap();
        ledger.settling(id, Some(200)).await.unwrap();
        // A stream: delivered before it settles.
        ledger.served(id).await.unwrap();
        id
    }
}

/// The proxy's `settle` of `auth` for `amount`, as calldata: what any account may send.
fn proxy_settle(auth: &PermitAuthorization, amount: U256) -> Bytes {
    let call = Proxy::settleCall {
        permit: Proxy::PermitTransferFrom {
            permitted: TokenPermissions { token: auth.token, amount: auth.ceiling },
            nonce: auth.nonce,
            deadline: auth.deadline,
        },
        amount,
        owner: auth.from,
        witness: Witness { to: auth.pay_to, facilitator: auth.facilitator, validAfter: auth.valid_after },
        signature: auth.signature.clone(),
    };
    Bytes::from(call.abi_encode())
}

/// Whether the receipt logged the proxy's `event` (`Settled()` or `SettledWithPermit()`).
fn logged(receipt: &TransactionReceipt, event: &str) -> bool {
    let topic = keccak256(event);
    receipt.inner.logs().iter().any(|log| log.address() == UPTO_PROXY && log.topics().first() == Some(&topic))
}

/// A `before` hook that counts its calls.
fn counting() -> (BeforeBroadcast, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let hook: BeforeBroadcast = Box::new(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    });
    (hook, calls)
}

fn rejection(outcome: Result<(), VerifyFailure>) -> Rejection {
    match outcome {
        Err(VerifyFailure::Rejected(rejection)) => rejection,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn an_actual_below_the_ceiling_moves_exactly_the_actual() {
    let Some(upto) = Upto::start().await else { return };
    let buyer = upto.buyer(CEILING).await;
    upto.approve_permit2(buyer.address()).await;
    let auth = upto.authorize(&buyer, upto.settler_address);
    upto.settler.verify_upto(&auth).await.unwrap();

    let actual = U256::from(123_456u64);
    let (before, recorded) = counting();
    let settled = upto.settler.settle_upto(&auth, actual, Some(before)).await.unwrap();

    assert_eq!(upto.chain.balance(upto.pay_to).await, actual);
    assert_eq!(upto.chain.balance(buyer.address()).await, U256::from(CEILING) - actual);
    assert_eq!(recorded.load(Ordering::SeqCst), 1, "the hash is recorded before the broadcast");
    let receipt = upto.receipt(&settled.transaction).await;
    assert!(receipt.status() && receipt.to == Some(UPTO_PROXY));
    assert!(logged(&receipt, "Settled()"), "through settle: the allowance was there");
    eprintln!("gas used by an upto settle: {}", receipt.gas_used);
}

#[tokio::test]
async fn the_same_authorization_settled_again_fails_on_chain_with_its_nonce_used() {
    let Some(upto) = Upto::start().await else { return };
    // Enough for the ceiling twice: the second try would have the balance for it.
    let buyer = upto.buyer(CEILING * 2).await;
    upto.approve_permit2(buyer.address()).await;
    let auth = upto.authorize(&buyer, upto.settler_address);
    upto.settler.settle_upto(&auth, U256::from(1000u64), None).await.unwrap();

    assert_eq!(rejection(upto.settler.verify_upto(&auth).await), Rejection::Permit2SimulationFailed);
    let failure = upto.settler.settle_upto(&auth, U256::from(2000u64), None).await.unwrap_err();
    assert_eq!(failure.reason, "permit2_invalid_nonce", "{failure:?}");
    // Used (by the first settlement): not something the ledger may free for another try.
    assert!(!failure.nothing_moved);
    let receipt = upto.receipt(failure.transaction.as_deref().expect("it went on chain")).await;
    assert!(!receipt.status(), "the second settlement reverted");
    assert_eq!(upto.chain.balance(upto.pay_to).await, U256::from(1000u64), "only the first moved money");
    assert_eq!(upto.chain.balance(buyer.address()).await, U256::from(CEILING * 2 - 1000));
}

#[tokio::test]
async fn a_first_time_buyer_with_no_allowance_and_no_ether_pays_through_its_eip2612_permit() {
    let Some(upto) = Upto::start().await else { return };
    let buyer = upto.buyer(CEILING).await;
    let mut auth = upto.authorize(&buyer, upto.settler_address);
    auth.eip2612 = Some(upto.permit(&buyer));
    assert_eq!(upto.view(allowanceCall { owner: buyer.address(), spender: PERMIT2 }).await, U256::ZERO);
    upto.settler.verify_upto(&auth).await.unwrap();

    let actual = U256::from(CEILING - 1);
    let settled = upto.settler.settle_upto(&auth, actual, None).await.unwrap();

    assert_eq!(upto.chain.balance(upto.pay_to).await, actual);
    let receipt = upto.receipt(&settled.transaction).await;
    assert!(logged(&receipt, "SettledWithPermit()"), "through settleWithPermit");
    assert_eq!(upto.view(noncesCall { owner: buyer.address() }).await, U256::from(1u64), "the permit was used");
    let rpc = &upto.chain.provider;
    assert_eq!(rpc.get_transaction_count(buyer.address()).await.unwrap(), 0, "the buyer sent no transaction");
    assert_eq!(rpc.get_balance(buyer.address()).await.unwrap(), U256::ZERO, "and has no ether");
    eprintln!("gas used by an upto settleWithPermit (first permit): {}", receipt.gas_used);
}

#[tokio::test]
async fn a_used_permit_does_not_stop_the_settlement_where_permit2_has_the_allowance() {
    let Some(upto) = Upto::start().await else { return };
    let buyer = upto.buyer(CEILING * 2).await;
    let permit = upto.permit(&buyer);
    let mut first = upto.authorize(&buyer, upto.settler_address);
    first.eip2612 = Some(permit.clone());
    upto.settler.settle_upto(&first, U256::from(1u64), None).await.unwrap();

    // The permit's allowance is spent below the ceiling, and the permit itself is used: nothing gives Permit2 the
    // ceiling again.
    let mut second = upto.authorize(&buyer, upto.settler_address);
    second.eip2612 = Some(permit);
    assert_eq!(rejection(upto.settler.verify_upto(&second).await), Rejection::Permit2AllowanceRequired);
    // Once the buyer approves, `settleWithPermit` goes on past the token's refusal of the used permit.
    upto.approve_permit2(buyer.address()).await;
    upto.settler.verify_upto(&second).await.unwrap();
    upto.settler.settle_upto(&second, U256::from(CEILING), None).await.unwrap();
    assert_eq!(upto.chain.balance(upto.pay_to).await, U256::from(CEILING + 1));
}

#[tokio::test]
async fn without_allowance_or_permit_verify_asks_for_the_allowance() {
    let Some(upto) = Upto::start().await else { return };
    let buyer = upto.buyer(CEILING).await;
    let auth = upto.authorize(&buyer, upto.settler_address);
    assert_eq!(rejection(upto.settler.verify_upto(&auth).await), Rejection::Permit2AllowanceRequired);
}

#[tokio::test]
async fn a_balance_below_the_ceiling_is_refused() {
    let Some(upto) = Upto::start().await else { return };
    let buyer = upto.buyer(CEILING - 1).await;
    upto.approve_permit2(buyer.address()).await;
    let auth = upto.authorize(&buyer, upto.settler_address);
    assert_eq!(rejection(upto.settler.verify_upto(&auth).await), Rejection::Permit2InsufficientBalance);
}

#[tokio::test]
async fn an_amount_above_the_ceiling_or_of_zero_is_refused_before_any_transaction() {
    let Some(upto) = Upto::start().await else { return };
    let buyer = upto.buyer(CEILING * 2).await;
    upto.approve_permit2(buyer.address()).await;
    let auth = upto.authorize(&buyer, upto.settler_address);
    let sent = upto.sent_by_settler().await;

    for (amount, reason) in
        [(CEILING + 1, "invalid_upto_evm_payload_settlement_exceeds_amount"), (0, "permit2_invalid_amount")]
    {
        let (before, recorded) = counting();
        let failure = upto.settler.settle_upto(&auth, U256::from(amount), Some(before)).await.unwrap_err();
        let refused =
            SettleFailure { reason: reason.into(), transaction: None, nothing_moved: true, ..failure.clone() };
        assert_eq!(failure, refused, "{amount}");
        assert_eq!(recorded.load(Ordering::SeqCst), 0, "nothing was signed");
    }
    assert_eq!(upto.sent_by_settler().await, sent, "no transaction");
    assert_eq!(upto.chain.balance(buyer.address()).await, U256::from(CEILING * 2));
    // The authorization is still good for the ceiling.
    upto.settler.settle_upto(&auth, U256::from(CEILING), None).await.unwrap();
    assert_eq!(upto.chain.balance(upto.pay_to).await, U256::from(CEILING));
}

#[tokio::test]
async fn a_witness_naming_another_facilitator_is_refused_and_the_proxy_lets_only_the_named_one_settle() {
    let Some(upto) = Upto::start().await else { return };
    let buyer = upto.buyer(CEILING).await;
    upto.approve_permit2(buyer.address()).await;
    let elsewhere = upto.authorize(&buyer, upto.chain.deployer);
    assert_eq!(rejection(upto.settler.verify_upto(&elsewhere).await), Rejection::UptoFacilitator);
    let sent = upto.sent_by_settler().await;
    let failure = upto.settler.settle_upto(&elsewhere, U256::from(1u64), None).await.unwrap_err();
    assert_eq!((failure.reason.as_str(), failure.nothing_moved), ("upto_facilitator_mismatch", true));
    assert_eq!(upto.sent_by_settler().await, sent, "no transaction");

    // An authorization for the settler, sent to the proxy by another account (anvil signs for the deployer).
    let ours = upto.authorize(&buyer, upto.settler_address);
    let input = proxy_settle(&ours, U256::from(1u64));
    let request = || TransactionRequest::default().from(upto.chain.deployer).to(UPTO_PROXY).input(input.clone().into());
    let revert = upto.chain.provider.call(request()).await.unwrap_err();
    let data = revert.as_error_resp().and_then(|e| e.as_revert_data()).expect("revert data");
    assert_eq!(data.as_ref(), Proxy::UnauthorizedFacilitator::SELECTOR.as_slice());
    let receipt = upto.chain.provider.send_transaction(request().gas_limit(300_000)).await.unwrap().get_receipt().await;
    assert!(!receipt.unwrap().status(), "the proxy reverts for a caller other than the witness's facilitator");
    assert_eq!(upto.chain.balance(upto.pay_to).await, U256::ZERO);
    // The settler named in it still can.
    upto.settler.settle_upto(&ours, U256::from(1u64), None).await.unwrap();
    assert_eq!(upto.chain.balance(upto.pay_to).await, U256::from(1u64));
}

/// The official facilitator calls the proxy through the ABI `@x402/evm` ships: every function and event in it must
/// be ours exactly (names, types, components, mutability), and every error too, but `InvalidPermit2Address`, which
/// the reference's constructor throws and ours, placed without one, has no use for.
#[tokio::test]
async fn the_proxy_has_the_abi_the_official_package_ships() {
    let Some(node) = tools::require(tools::node()) else { return };
    let output = node.script("upto-proxy-abi.mjs").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let shipped: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    let path = common::repo_path("contracts/x402UptoPermit2Proxy.abi.json");
    let ours: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let entry = |abi: &[serde_json::Value], kind: &str, name: &str| {
        abi.iter().find(|e| e["type"] == kind && e["name"] == name).cloned()
    };
    let mut checked = 0;
    for expected in &shipped {
        let (kind, name) = (expected["type"].as_str().unwrap(), expected["name"].as_str().unwrap());
        if (kind, name) == ("error", "InvalidPermit2Address") {
            continue;
        }
        assert_eq!(entry(&ours, kind, name).as_ref(), Some(expected), "{kind} {name}");
        checked += 1;
    }
    assert!(checked >= 7, "settle, settleWithPermit, the three constants and both events at least");
}

#[tokio::test]
async fn reconciliation_counts_an_upto_row_paid_only_when_its_charge_was_settled_on_its_terms() {
    let Some(upto) = Upto::start().await else { return };
    let ledger = Ledger::open(&common::test_dir().join("ledger.db")).unwrap();
    let charge = 1_000u64;
    let fresh_buyer = || async {
        let buyer = upto.buyer(CEILING).await;
        upto.approve_permit2(buyer.address()).await;
        buyer
    };

    // Settled through the proxy, though the facilitator never said so: found by its transaction.
    let paid = fresh_buyer().await;
    let paid_auth = upto.authorize(&paid, upto.settler_address);
    let paid_row = upto.unanswered_row(&ledger, &paid_auth, charge).await;
    let settled = upto.settler.settle_upto(&paid_auth, U256::from(charge), None).await.unwrap();

    // Settled, then the same nonce "cancelled" by the buyer afterwards (a no-op on Permit2's bitmap that still
    // logs the event): the settlement is what counts.
    let late = fresh_buyer().await;
    let late_auth = upto.authorize(&late, upto.settler_address);
    let late_row = upto.unanswered_row(&ledger, &late_auth, charge).await;
    let late_settled = upto.settler.settle_upto(&late_auth, U256::from(charge), None).await.unwrap();
    upto.cancel(&late_auth).await;

    // Cancelled by the buyer before anything settled: nothing moved, whatever the bitmap says.
    let dodger = fresh_buyer().await;
    let dodged = upto.authorize(&dodger, upto.settler_address);
    let dodged_row = upto.unanswered_row(&ledger, &dodged, charge).await;
    upto.cancel(&dodged).await;

    // Spent by the buyer's own permit of the same nonce, naming an accomplice as facilitator, for 1 unit to
    // the payee: the nonce is spent and the payee was paid something, but not this charge.
    let forger = fresh_buyer().await;
    let forged = upto.authorize(&forger, upto.settler_address);
    let forged_row = upto.unanswered_row(&ledger, &forged, charge).await;
    let own = upto.authorize_nonce(&forger, upto.chain.deployer, forged.nonce);
    let tx = TransactionRequest::default()
        .from(upto.chain.deployer)
        .to(UPTO_PROXY)
        .input(proxy_settle(&own, U256::from(1u64)).into())
        .gas_limit(300_000);
    let receipt = upto.chain.provider.send_transaction(tx).await.unwrap().get_receipt().await.unwrap();
    assert!(receipt.status(), "the accomplice settles the buyer's own permit");

    // Failed while it could still land, its answer out already (a stream), then settled after all: paid, not
    // a refund.
    let slow = fresh_buyer().await;
    let slow_auth = upto.authorize(&slow, upto.settler_address);
    let slow_row = upto.unanswered_row(&ledger, &slow_auth, charge).await;
    ledger.failed(slow_row, "refused before any broadcast".into(), None).await.unwrap();
    let slow_settled = upto.settler.settle_upto(&slow_auth, U256::from(charge), None).await.unwrap();

    let chains = std::collections::HashMap::from([(chain::CHAIN_ID, upto.chain.provider.clone())]);
    let future = now() + 3600;
    let chunk = std::num::NonZeroU64::new(2000).unwrap();
    let report = x402_gateway::ledger::reconcile(&ledger, &chains, chunk, future, future).await.unwrap();
    assert_eq!((report.settled, report.failed, report.refunds), (3, 2, 0), "{report:?}");

    let ledger = &ledger;
    let row = |id| async move { ledger.get(id).await.unwrap().unwrap() };
    let state = |row: x402_gateway::ledger::Row| (row.state.to_string(), row.transaction, row.failure);
    let settled_as = |tx: &str| ("settled".to_string(), Some(tx.to_string()), None);
    assert_eq!(state(row(paid_row).await), settled_as(&settled.transaction));
    assert_eq!(state(row(late_row).await), settled_as(&late_settled.transaction));
    assert_eq!(state(row(slow_row).await), settled_as(&slow_settled.transaction));
    let unpaid = ("failed".to_string(), None, Some(x402_gateway::ledger::SPENT_UNPAID.to_string()));
    assert_eq!(state(row(dodged_row).await), unpaid);
    let forged = row(forged_row).await;
    assert_eq!(forged.state, "failed");
    let other_terms = format!("{}: 1 in {}", x402_gateway::ledger::OTHER_TERMS, receipt.transaction_hash);
    assert_eq!(forged.failure, Some(other_terms), "named, with what it did pay");
    assert_eq!(upto.chain.balance(dodger.address()).await, U256::from(CEILING), "the dodger paid nothing");
    assert_eq!(upto.chain.balance(forger.address()).await, U256::from(CEILING - 1), "the forger paid 1 unit");
    let revenue = ledger.revenue().await.unwrap();
    assert_eq!(revenue.iter().map(|r| r.amount.parse::<u64>().unwrap()).sum::<u64>(), 3 * charge, "{revenue:?}");

    // Decided for good: another pass changes nothing, and looks for nothing more.
    let again = x402_gateway::ledger::reconcile(ledger, &chains, chunk, future, future).await.unwrap();
    assert_eq!(again, x402_gateway::ledger::Reconciled::default());
}
