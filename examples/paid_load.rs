//! A paid-call load driver for benchmarks on a local chain (`bench/paid.sh` runs it). It pre-signs N
//! distinct authorizations, one buyer per concurrent connection, sends them with concurrency C, and reports
//! paid calls/s, latency percentiles, and what settled on chain (payments, transactions, gas per payment).
//!
//! ```text
//! cargo run --release --example paid_load -- deploy --rpc http://127.0.0.1:8545
//! cargo run --release --example paid_load -- run --url http://127.0.0.1:8080/paid --rpc http://127.0.0.1:8545 -n 5000 -c 64
//! cargo run --release --example paid_load -- run --url http://127.0.0.1:8080/free --free -n 5000 -c 64
//! ```
//!
//! Buyers are funded by minting the repository's TestUSDC from anvil's first dev account: this is for anvil
//! only, never for a real chain.

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, Bytes, B256, U256};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use clap::{Parser, Subcommand};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use x402_gateway::x402::codec;
use x402_gateway::x402::wire::SettleResponse;

/// Anvil's first dev account, unlocked on anvil: it deploys the contracts and mints the buyers' funds.
const ANVIL_DEPLOYER: Address = alloy::primitives::address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266");

alloy::sol! {
    function mint(address to, uint256 amount) external;
}

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Deploys TestUSDC and Multicall from `contracts/` and prints their addresses as shell assignments.
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
        #[arg(short = 'n', long, default_value_t = 2000)]
        calls: usize,
        #[arg(short = 'c', long, default_value_t = 64)]
        concurrency: usize,
        /// A label for the report line.
        #[arg(long, default_value = "run")]
        label: String,
    },
}

#[tokio::main]
async fn main() -> Result<(), String> {
    match Args::parse().command {
        Command::Deploy { rpc } => {
            let provider = x402_gateway::chain::connect(&rpc, Duration::from_secs(30));
            for name in ["TestUSDC", "Multicall"] {
                println!("{}={}", name.to_uppercase(), deploy(&provider, name).await?);
            }
            Ok(())
        }
        Command::Run { url, rpc, free, calls, concurrency, label } => {
            let concurrency = concurrency.clamp(1, calls.max(1));
            let plan =
                if free { Plan::free(calls, concurrency) } else { Plan::paid(&url, rpc, calls, concurrency).await? };
            let report = run(&url, plan).await;
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

/// What each connection sends: its own list of payment headers (or none, for a free route).
struct Plan {
    per_worker: Vec<Vec<Option<HeaderValue>>>,
    chain: Option<Chain>,
}

/// Where a paid run checks its payments landed.
struct Chain {
    provider: RootProvider,
    token: Address,
    pay_to: Address,
    amount: U256,
    balance_before: U256,
}

impl Plan {
    fn free(calls: usize, concurrency: usize) -> Plan {
        Plan { per_worker: split((0..calls).map(|_| None), concurrency), chain: None }
    }

    /// One buyer per connection, funded for its share, and every authorization signed before the clock starts.
    async fn paid(url: &Uri, rpc: Option<Uri>, calls: usize, concurrency: usize) -> Result<Plan, String> {
        let rpc = rpc.ok_or("a paid run needs --rpc")?;
        let provider = x402_gateway::chain::connect(&rpc, Duration::from_secs(30));
        let challenge = client().request(get(url, None)).await.map_err(|e| format!("{url}: {e}"))?;
        if challenge.status() != StatusCode::PAYMENT_REQUIRED {
            return Err(format!("{url} answered {} to an unpaid call, not 402", challenge.status()));
        }
        let challenge = challenge.headers().clone();
        let offer: x402_gateway::x402::wire::PaymentRequiredV2 = codec::decode(
            challenge.get("payment-required").ok_or("the 402 has no PAYMENT-REQUIRED header")?.as_bytes(),
        )
        .map_err(|e| format!("PAYMENT-REQUIRED: {e}"))?;
        let offer = offer.accepts.first().ok_or("the challenge offers nothing")?;
        let token: Address = offer.asset.parse().map_err(|_| "the offer's asset is not an address")?;
        let pay_to: Address = offer.pay_to.parse().map_err(|_| "the offer's payTo is not an address")?;
        let mut per_worker = Vec::new();
        let mut amount = U256::ZERO;
        for worker in 0..concurrency {
            let buyer = PrivateKeySigner::random();
            let mut headers = Vec::new();
            for _ in 0..calls / concurrency + usize::from(worker < calls % concurrency) {
                let (price, header) = x402_gateway::buyer::v2_payment(&buyer, &challenge).map_err(|e| e.to_string())?;
                amount = price;
                headers.push(Some(header));
            }
            fund(&provider, token, buyer.address(), amount * U256::from(headers.len())).await?;
            per_worker.push(headers);
        }
        let balance_before =
            x402_gateway::chain::balance_of(&provider, token, pay_to).await.map_err(|e| e.to_string())?;
        Ok(Plan { per_worker, chain: Some(Chain { provider, token, pay_to, amount, balance_before }) })
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
    let call = mintCall { to: buyer, amount }.abi_encode();
    let tx = TransactionRequest::default().from(ANVIL_DEPLOYER).to(token).input(Bytes::from(call).into());
    let pending = provider.send_transaction(tx).await.map_err(|e| format!("mint: {e}"))?;
    pending.get_receipt().await.map_err(|e| format!("mint: {e}"))?;
    Ok(())
}

type HttpClient = Client<HttpConnector, Empty<bytes::Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(HttpConnector::new())
}

fn get(url: &Uri, payment: Option<HeaderValue>) -> Request<Empty<bytes::Bytes>> {
    let mut request = Request::new(Empty::new());
    *request.uri_mut() = url.clone();
    if let Some(payment) = payment {
        request.headers_mut().insert("payment-signature", payment);
    }
    request
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

async fn run(url: &Uri, plan: Plan) -> Report {
    let client = client();
    let started = Instant::now();
    let workers: Vec<_> = plan
        .per_worker
        .into_iter()
        .map(|headers| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut calls = Vec::with_capacity(headers.len());
                for payment in headers {
                    let sent = Instant::now();
                    let (status, settlement) = match client.request(get(&url, payment)).await {
                        Ok(response) => {
                            let settlement = response
                                .headers()
                                .get("payment-response")
                                .and_then(|v| codec::decode::<SettleResponse>(v.as_bytes()).ok());
                            let status = response.status();
                            let _ = response.into_body().collect().await;
                            (Some(status), settlement)
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
        let settled: Vec<&SettleResponse> =
            self.calls.iter().filter_map(|c| c.settlement.as_ref()).filter(|s| s.success).collect();
        let transactions: BTreeSet<B256> = settled.iter().filter_map(|s| s.transaction.parse().ok()).collect();
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
            let balance = x402_gateway::chain::balance_of(&chain.provider, chain.token, chain.pay_to)
                .await
                .map_err(|e| e.to_string())?;
            let mut gas = 0u64;
            for hash in &transactions {
                let receipt = chain.provider.get_transaction_receipt(*hash).await.map_err(|e| e.to_string())?;
                gas += receipt.map_or(0, |r| r.gas_used);
            }
            let received = balance - chain.balance_before;
            report["settled"] = settled.len().into();
            let payments = received.checked_div(chain.amount).and_then(|n| u64::try_from(n).ok());
            report["settled_on_chain"] = payments.into();
            report["transactions"] = transactions.len().into();
            report["gas_per_payment"] = (gas / settled.len().max(1) as u64).into();
        }
        println!("{report}");
        Ok(())
    }
}
