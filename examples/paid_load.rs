//! A paid-call load driver for benchmarks on a local chain (`bench/paid.sh` runs it). It pre-signs N
//! distinct payments, one buyer per concurrent connection, sends them with concurrency C, and reports
//! paid calls/s, latency percentiles, and what settled on chain (payments, transactions, gas per payment).
//!
//! ```text
//! cargo run --release --example paid_load -- deploy --rpc http://127.0.0.1:8545
//! cargo run --release --example paid_load -- run --url http://127.0.0.1:8080/paid --rpc http://127.0.0.1:8545 -n 5000 -c 64
//! cargo run --release --example paid_load -- run --url http://127.0.0.1:8080/chat --rpc http://127.0.0.1:8545 --scheme upto --stream
//! cargo run --release --example paid_load -- run --url http://127.0.0.1:8080/free --free -n 5000 -c 64
//! ```
//!
//! `exact` calls are GETs paid by EIP-3009 authorizations. `upto` calls POST one chat body (model
//! [`UPTO_MODEL`], asking for a stream with `--stream`) to a per-token route, paid by Permit2 authorizations of
//! the ceiling the route's 402 names for that body; each buyer approves Permit2 once, before the clock starts.
//!
//! Buyers are funded by minting the repository's TestUSDC from anvil's first dev account, and Permit2 is placed
//! with anvil's cheat methods: this is for anvil only, never for a real chain.

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, Bytes, B256, U256};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::json_rpc::RpcSend;
use alloy::rpc::types::{Filter, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::signers::SignerSync;
use alloy::sol_types::{SolCall, SolEvent, SolStruct};
use clap::{Parser, Subcommand, ValueEnum};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use x402_gateway::x402::codec;
use x402_gateway::x402::wire::{PaymentPayloadV2, PaymentRequiredV2, RequirementsV2, SettleResponse};
use x402_proto::upto_evm::{PermitWitnessTransferFrom, TokenPermissions, Witness, PERMIT2, UPTO_PROXY};

/// Anvil's first dev account, unlocked on anvil: it deploys the contracts and mints the buyers' funds.
const ANVIL_DEPLOYER: Address = alloy::primitives::address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266");
/// The Permit2 deployment script of the interop packages, whose one hex literal is Permit2's runtime code.
const DEPLOY_PERMIT2: &str =
    "tests/interop/node_modules/@uniswap/v4-periphery/lib/permit2/test/utils/DeployPermit2.sol";
const UPTO_PROXY_CODE: &str = "contracts/x402UptoPermit2Proxy.runtime.bin";
/// The model an `upto` run's chat body names: the per-token route prices it.
const UPTO_MODEL: &str = "bench";

alloy::sol! {
    function mint(address to, uint256 amount) external;
    function approve(address spender, uint256 value) external returns (bool);
    function DOMAIN_SEPARATOR() external view returns (bytes32);
    event Transfer(address indexed from, address indexed to, uint256 value);
}

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Deploys TestUSDC and Multicall from `contracts/` and prints their addresses as shell assignments; places
    /// Permit2 and the upto proxy at their canonical addresses.
    Deploy {
        #[arg(long)]
        rpc: Uri,
    },
    /// Sends N calls with concurrency C and reports what happened.
    Run {
        #[arg(long)]
        url: Uri,
        /// The chain the route is paid on (to fund buyers and check settlement); not needed with `--free`.
        #[arg(long)]
        rpc: Option<Uri>,
        /// Send no payment: the same load on a free route, for comparison.
        #[arg(long)]
        free: bool,
        /// How the calls pay.
        #[arg(long, value_enum, default_value_t = Scheme::Exact)]
        scheme: Scheme,
        /// `upto` only: the chat body asks for an SSE stream.
        #[arg(long)]
        stream: bool,
        #[arg(short = 'n', long, default_value_t = 2000)]
        calls: usize,
        #[arg(short = 'c', long, default_value_t = 64)]
        concurrency: usize,
        /// A label for the report line.
        #[arg(long, default_value = "run")]
        label: String,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scheme {
    /// GETs paid with EIP-3009 authorizations of the route's price.
    Exact,
    /// Chat POSTs paid with Permit2 authorizations of the route's ceiling, settled by the answer's usage.
    Upto,
}

#[tokio::main]
async fn main() -> Result<(), String> {
    match Args::parse().command {
        Command::Deploy { rpc } => {
            let provider = x402_gateway::chain::connect(&rpc, Duration::from_secs(30));
            for name in ["TestUSDC", "Multicall"] {
                println!("{}={}", name.to_uppercase(), deploy(&provider, name).await?);
            }
            place_upto_contracts(&provider).await
        }
        Command::Run { url, rpc, free, scheme, stream, calls, concurrency, label } => {
            let concurrency = concurrency.clamp(1, calls.max(1));
            if stream && scheme != Scheme::Upto {
                return Err("--stream is for --scheme upto".into());
            }
            let target = match scheme {
                Scheme::Upto => Target::chat(url, stream),
                Scheme::Exact => Target::get(url),
            };
            let plan = match (free, scheme) {
                (true, _) => Plan::free(target, calls, concurrency),
                (false, Scheme::Exact) => Plan::exact(target, rpc, calls, concurrency).await?,
                (false, Scheme::Upto) => Plan::upto(target, rpc, calls, concurrency).await?,
            };
            let report = run(plan).await;
            report.print(&label).await
        }
    }
}

async fn deploy(provider: &RootProvider, name: &str) -> Result<Address, String> {
    let path = format!("{}/contracts/{name}.bin", env!("CARGO_MANIFEST_DIR"));
    let hex = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let code: Bytes = alloy::hex::decode(hex.trim()).map_err(|e| format!("{path}: {e}"))?.into();
    let deploy = TransactionRequest::default().from(ANVIL_DEPLOYER).with_deploy_code(code);
    let receipt = provider
        .send_transaction(deploy)
        .await
        .map_err(|e| format!("deploy {name}: {e}"))?
        .get_receipt()
        .await
        .map_err(|e| format!("deploy {name}: {e}"))?;
    receipt.contract_address.ok_or_else(|| format!("{name} was not deployed"))
}

/// Permit2 (its runtime code from the interop packages) and the repository's `x402UptoPermit2Proxy`, placed at
/// their canonical addresses with `anvil_setCode`, as the `upto` chain tests place them.
async fn place_upto_contracts(provider: &RootProvider) -> Result<(), String> {
    let path = format!("{}/{DEPLOY_PERMIT2}", env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "{path}: {e}: Permit2's runtime code comes from the interop packages: run `npm ci --prefix tests/interop`"
        )
    })?;
    // The file holds exactly one literal, `hex"..."`: the code `vm.etch` places at Permit2's address.
    let permit2 = source
        .split_once("hex\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .ok_or_else(|| format!("{path} holds no hex\"...\" literal: not the expected package"))?
        .0;
    let path = format!("{}/{UPTO_PROXY_CODE}", env!("CARGO_MANIFEST_DIR"));
    let proxy = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    for (at, code) in [(PERMIT2, permit2), (UPTO_PROXY, proxy.trim())] {
        let code = format!("0x{}", code.trim_start_matches("0x"));
        anvil(provider, "anvil_setCode", (at, code)).await?;
    }
    // The proxy's reentrancy guard as its constructor leaves it (not entered), so that the first settlement
    // pays the gas it would on a real chain.
    anvil(provider, "anvil_setStorageAt", (UPTO_PROXY, B256::ZERO, B256::from(U256::from(1)))).await?;
    // Permit2's code caches the domain separator of the chain it was taken from (31337): on that chain id every
    // signature would fail.
    let chain_id = provider.get_chain_id().await.map_err(|e| format!("eth_chainId: {e}"))?;
    let call =
        TransactionRequest::default().to(PERMIT2).input(Bytes::from(DOMAIN_SEPARATORCall {}.abi_encode()).into());
    let answer = provider.call(call).await.map_err(|e| format!("Permit2 DOMAIN_SEPARATOR: {e}"))?;
    let separator = DOMAIN_SEPARATORCall::abi_decode_returns(&answer).map_err(|e| format!("DOMAIN_SEPARATOR: {e}"))?;
    if separator != permit2_domain(chain_id).separator() {
        return Err(format!(
            "Permit2's domain separator is not chain {chain_id}'s: run anvil with a --chain-id other than 31337"
        ));
    }
    Ok(())
}

fn permit2_domain(chain_id: u64) -> alloy::sol_types::Eip712Domain {
    alloy::sol_types::eip712_domain! { name: "Permit2", chain_id: chain_id, verifying_contract: PERMIT2, }
}

async fn anvil(provider: &RootProvider, method: &'static str, params: impl RpcSend) -> Result<(), String> {
    let _: serde_json::Value =
        provider.raw_request(method.into(), params).await.map_err(|e| format!("{method}: {e}"))?;
    Ok(())
}

/// What every call of a run asks for: a GET, or a POST of a JSON body.
#[derive(Clone)]
struct Target {
    url: Uri,
    body: Option<bytes::Bytes>,
}

impl Target {
    fn get(url: Uri) -> Target {
        Target { url, body: None }
    }

    fn chat(url: Uri, stream: bool) -> Target {
        let body = serde_json::json!({
            "model": UPTO_MODEL,
            "messages": [{ "role": "user", "content": "Say hello to the paying buyers." }],
            "stream": stream,
        });
        Target { url, body: Some(body.to_string().into()) }
    }

    fn request(&self, payment: Option<HeaderValue>) -> Request<Full<bytes::Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone().unwrap_or_default()));
        *request.uri_mut() = self.url.clone();
        if self.body.is_some() {
            *request.method_mut() = Method::POST;
            let headers = request.headers_mut();
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            // A stream's receipt comes in the trailers, which HTTP/1.1 sends only to a client that asks.
            headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        }
        if let Some(payment) = payment {
            request.headers_mut().insert("payment-signature", payment);
        }
        request
    }

    /// The route's 402 to an unpaid call: its `PAYMENT-REQUIRED` header.
    async fn challenge(&self) -> Result<HeaderMap, String> {
        let url = &self.url;
        let challenge = client().request(self.request(None)).await.map_err(|e| format!("{url}: {e}"))?;
        if challenge.status() != StatusCode::PAYMENT_REQUIRED {
            return Err(format!("{url} answered {} to an unpaid call, not 402", challenge.status()));
        }
        Ok(challenge.headers().clone())
    }
}

/// What each connection sends: its own list of payment headers (or none, for a free route).
struct Plan {
    target: Target,
    per_worker: Vec<Vec<Option<HeaderValue>>>,
    chain: Option<Chain>,
}

/// Where a paid run checks its payments landed: the token's transfers to the payee from `from_block` on.
struct Chain {
    provider: RootProvider,
    token: Address,
    pay_to: Address,
    from_block: u64,
}

impl Chain {
    /// Once every buyer is funded, so that only the run's own transfers count.
    async fn after_setup(provider: RootProvider, token: Address, pay_to: Address) -> Result<Chain, String> {
        let from_block = provider.get_block_number().await.map_err(|e| format!("eth_blockNumber: {e}"))? + 1;
        Ok(Chain { provider, token, pay_to, from_block })
    }
}

fn offer(challenge: &HeaderMap) -> Result<PaymentRequiredV2, String> {
    codec::decode(challenge.get("payment-required").ok_or("the 402 has no PAYMENT-REQUIRED header")?.as_bytes())
        .map_err(|e| format!("PAYMENT-REQUIRED: {e}"))
}

fn address(what: &str, text: &str) -> Result<Address, String> {
    text.parse().map_err(|_| format!("the offer's {what} is not an address"))
}

impl Plan {
    fn free(target: Target, calls: usize, concurrency: usize) -> Plan {
        Plan { target, per_worker: split((0..calls).map(|_| None), concurrency), chain: None }
    }

    /// One buyer per connection, funded for its share, and every authorization signed before the clock starts.
    async fn exact(target: Target, rpc: Option<Uri>, calls: usize, concurrency: usize) -> Result<Plan, String> {
        let provider = x402_gateway::chain::connect(&rpc.ok_or("a paid run needs --rpc")?, Duration::from_secs(30));
        let challenge = target.challenge().await?;
        let required = offer(&challenge)?;
        let offer = required.accepts.first().ok_or("the challenge offers nothing")?;
        let token = address("asset", &offer.asset)?;
        let pay_to = address("payTo", &offer.pay_to)?;
        let mut per_worker = Vec::new();
        for share in shares(calls, concurrency) {
            let buyer = PrivateKeySigner::random();
            let mut headers = Vec::new();
            let mut amount = U256::ZERO;
            for _ in 0..share {
                let (price, header) = x402_gateway::buyer::v2_payment(&buyer, &challenge).map_err(|e| e.to_string())?;
                amount = price;
                headers.push(Some(header));
            }
            fund(&provider, token, buyer.address(), amount * U256::from(headers.len())).await?;
            per_worker.push(headers);
        }
        let chain = Chain::after_setup(provider, token, pay_to).await?;
        Ok(Plan { target, per_worker, chain: Some(chain) })
    }

    /// One buyer per connection, funded for its share at the ceiling, with Permit2's allowance, and every
    /// authorization signed before the clock starts. Every call sends the same body, so one 402 gives the
    /// ceiling of all.
    async fn upto(target: Target, rpc: Option<Uri>, calls: usize, concurrency: usize) -> Result<Plan, String> {
        let provider = x402_gateway::chain::connect(&rpc.ok_or("a paid run needs --rpc")?, Duration::from_secs(30));
        let offer = UptoOffer::of(&target.challenge().await?)?;
        let mut per_worker = Vec::new();
        for share in shares(calls, concurrency) {
            let buyer = PrivateKeySigner::random();
            let headers = (0..share).map(|_| offer.sign(&buyer).map(Some)).collect::<Result<Vec<_>, _>>()?;
            fund(&provider, offer.token, buyer.address(), offer.ceiling * U256::from(share)).await?;
            approve_permit2(&provider, offer.token, buyer.address()).await?;
            per_worker.push(headers);
        }
        let chain = Chain::after_setup(provider, offer.token, offer.pay_to).await?;
        Ok(Plan { target, per_worker, chain: Some(chain) })
    }
}

/// Each connection's number of calls.
fn shares(calls: usize, concurrency: usize) -> impl Iterator<Item = usize> {
    (0..concurrency).map(move |worker| calls / concurrency + usize::from(worker < calls % concurrency))
}

/// A 402's `upto` offer, and what a Permit2 authorization of it signs.
struct UptoOffer {
    required: PaymentRequiredV2,
    accepted: RequirementsV2,
    token: Address,
    pay_to: Address,
    ceiling: U256,
    facilitator: Address,
    domain: alloy::sol_types::Eip712Domain,
}

impl UptoOffer {
    fn of(challenge: &HeaderMap) -> Result<UptoOffer, String> {
        let required = offer(challenge)?;
        let accepted =
            required.accepts.iter().find(|o| o.scheme == "upto").cloned().ok_or("the challenge offers no `upto`")?;
        let chain_id = x402_gateway::networks::chain_id_of(&accepted.network)
            .ok_or_else(|| format!("{} is not an EVM network", accepted.network))?;
        let facilitator =
            accepted.extra["facilitatorAddress"].as_str().ok_or("the offer has no extra.facilitatorAddress")?;
        Ok(UptoOffer {
            token: address("asset", &accepted.asset)?,
            pay_to: address("payTo", &accepted.pay_to)?,
            ceiling: accepted.amount.parse().map_err(|_| "the offer's amount is not a number")?,
            facilitator: address("extra.facilitatorAddress", facilitator)?,
            domain: permit2_domain(chain_id),
            accepted,
            required,
        })
    }

    /// A `PAYMENT-SIGNATURE` with a fresh Permit2 nonce, as the official client signs it.
    fn sign(&self, buyer: &PrivateKeySigner) -> Result<HeaderValue, String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let message = PermitWitnessTransferFrom {
            permitted: TokenPermissions { token: self.token, amount: self.ceiling },
            spender: UPTO_PROXY,
            nonce: U256::from_be_bytes(B256::random().0),
            deadline: U256::from(now + self.accepted.max_timeout_seconds),
            witness: Witness { to: self.pay_to, facilitator: self.facilitator, validAfter: U256::ZERO },
        };
        let signature = buyer.sign_hash_sync(&message.eip712_signing_hash(&self.domain)).map_err(|e| e.to_string())?;
        let payload = serde_json::json!({
            "signature": signature.to_string(),
            "permit2Authorization": {
                "permitted": { "token": self.token.to_string(), "amount": self.ceiling.to_string() },
                "from": buyer.address().to_string(),
                "spender": UPTO_PROXY.to_string(),
                "nonce": message.nonce.to_string(),
                "deadline": message.deadline.to_string(),
                "witness": {
                    "to": self.pay_to.to_string(),
                    "facilitator": self.facilitator.to_string(),
                    "validAfter": "0",
                },
            },
        });
        let resource = serde_json::to_value(&self.required.resource).map_err(|e| e.to_string())?;
        let payment = PaymentPayloadV2 {
            x402_version: 2,
            resource: Some(resource),
            accepted: self.accepted.clone(),
            payload,
            extensions: None,
        };
        HeaderValue::from_str(&codec::encode(&payment)).map_err(|e| e.to_string())
    }
}

fn split<T>(items: impl Iterator<Item = T>, parts: usize) -> Vec<Vec<T>> {
    let mut split: Vec<Vec<T>> = (0..parts).map(|_| Vec::new()).collect();
    for (i, item) in items.enumerate() {
        split[i % parts].push(item);
    }
    split
}

async fn fund(provider: &RootProvider, token: Address, buyer: Address, amount: U256) -> Result<(), String> {
    send_from(provider, ANVIL_DEPLOYER, token, mintCall { to: buyer, amount }.abi_encode(), "mint").await
}

/// The buyer's one-time `approve(Permit2, max)` from its own account: anvil signs for it, given the ether,
/// which it takes back after, so that the buyer pays no gas for its payments.
async fn approve_permit2(provider: &RootProvider, token: Address, buyer: Address) -> Result<(), String> {
    anvil(provider, "anvil_setBalance", (buyer, U256::from(10u64).pow(U256::from(18)))).await?;
    anvil(provider, "anvil_impersonateAccount", (buyer,)).await?;
    let approve = approveCall { spender: PERMIT2, value: U256::MAX }.abi_encode();
    send_from(provider, buyer, token, approve, "approve Permit2").await?;
    anvil(provider, "anvil_stopImpersonatingAccount", (buyer,)).await?;
    anvil(provider, "anvil_setBalance", (buyer, U256::ZERO)).await
}

async fn send_from(
    provider: &RootProvider,
    from: Address,
    to: Address,
    input: Vec<u8>,
    what: &str,
) -> Result<(), String> {
    let tx = TransactionRequest::default().from(from).to(to).input(Bytes::from(input).into());
    let pending = provider.send_transaction(tx).await.map_err(|e| format!("{what}: {e}"))?;
    let receipt = pending.get_receipt().await.map_err(|e| format!("{what}: {e}"))?;
    if !receipt.status() {
        return Err(format!("{what}: the transaction reverted"));
    }
    Ok(())
}

type HttpClient = Client<HttpConnector, Full<bytes::Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(HttpConnector::new())
}

struct Call {
    latency: Duration,
    status: Option<StatusCode>,
    settlement: Option<SettleResponse>,
}

struct Report {
    calls: Vec<Call>,
    elapsed: Duration,
    chain: Option<Chain>,
}

fn settlement(headers: Option<&HeaderMap>) -> Option<SettleResponse> {
    headers?.get("payment-response").and_then(|v| codec::decode::<SettleResponse>(v.as_bytes()).ok())
}

async fn run(plan: Plan) -> Report {
    let client = client();
    let started = Instant::now();
    let workers: Vec<_> = plan
        .per_worker
        .into_iter()
        .map(|payments| {
            let (client, target) = (client.clone(), plan.target.clone());
            tokio::spawn(async move {
                let mut calls = Vec::with_capacity(payments.len());
                for payment in payments {
                    let sent = Instant::now();
                    let (status, settlement) = match client.request(target.request(payment)).await {
                        Ok(response) => {
                            let status = response.status();
                            let (parts, body) = response.into_parts();
                            // In the head, or (for a stream) in the trailers once it has ended.
                            let body = body.collect().await.ok();
                            let settled = settlement(Some(&parts.headers))
                                .or_else(|| settlement(body.as_ref().and_then(|b| b.trailers())));
                            (Some(status), settled)
                        }
                        Err(_) => (None, None),
                    };
                    calls.push(Call { latency: sent.elapsed(), status, settlement });
                }
                calls
            })
        })
        .collect();
    let mut calls = Vec::new();
    for worker in workers {
        calls.extend(worker.await.unwrap_or_default());
    }
    Report { calls, elapsed: started.elapsed(), chain: plan.chain }
}

impl Report {
    async fn print(&self, label: &str) -> Result<(), String> {
        let mut latencies: Vec<Duration> = self.calls.iter().map(|c| c.latency).collect();
        latencies.sort();
        let percentile = |p: f64| {
            let index = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len().max(1)) - 1;
            latencies.get(index).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        let ok = self.calls.iter().filter(|c| c.status == Some(StatusCode::OK)).count();
        let settled = self.calls.iter().filter_map(|c| c.settlement.as_ref()).filter(|s| s.success).count();
        let mut report = serde_json::json!({
            "label": label,
            "calls": self.calls.len(),
            "ok": ok,
            "failed": self.calls.len() - ok,
            "seconds": self.elapsed.as_secs_f64(),
            "calls_per_sec": ok as f64 / self.elapsed.as_secs_f64(),
            "p50_ms": percentile(0.50),
            "p90_ms": percentile(0.90),
            "p99_ms": percentile(0.99),
        });
        if let Some(chain) = &self.chain {
            // What landed, from the chain itself: each payment is one transfer of the token to the payee.
            let transfers = Filter::new()
                .address(chain.token)
                .event_signature(Transfer::SIGNATURE_HASH)
                .topic2(chain.pay_to.into_word())
                .from_block(chain.from_block);
            let logs = chain.provider.get_logs(&transfers).await.map_err(|e| format!("eth_getLogs: {e}"))?;
            let received: U256 = logs.iter().map(|log| U256::from_be_slice(log.data().data.as_ref())).sum();
            let transactions: BTreeSet<B256> = logs.iter().filter_map(|log| log.transaction_hash).collect();
            let mut gas = 0u64;
            for hash in &transactions {
                let receipt = chain.provider.get_transaction_receipt(*hash).await.map_err(|e| e.to_string())?;
                gas += receipt.map_or(0, |r| r.gas_used);
            }
            let payments = logs.len().max(1);
            report["settled"] = settled.into();
            report["settled_on_chain"] = logs.len().into();
            report["transactions"] = transactions.len().into();
            report["gas_per_payment"] = (gas / payments as u64).into();
            report["amount_per_payment"] = (received / U256::from(payments)).to_string().into();
        }
        println!("{report}");
        Ok(())
    }
}
