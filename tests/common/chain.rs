//! A real local chain for the tests: `anvil` (see `tools::anvil` for where it is found) on a port the kernel
//! picks. A `Chain` is one test's part of it: a TestUSDC (the repository's EIP-3009 token) and accounts of its
//! own, fresh and funded with ether, so that the tests sharing one anvil (`Chain::shared`) stay independent.

use super::config::Network;
use super::tools;
use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, Bytes, B256, U256};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

pub const CHAIN_ID: u64 = 84532;

sol! {
    function mint(address to, uint256 amount);
    function transferWithAuthorization(address from, address to, uint256 value, uint256 validAfter, uint256 validBefore, bytes32 nonce, uint8 v, bytes32 r, bytes32 s) external;
}

/// The token call that lands an `exact` payload (its `signature` and `authorization`).
pub fn transfer_call(payload: &serde_json::Value) -> transferWithAuthorizationCall {
    let auth = &payload["authorization"];
    let field = |name: &str| auth[name].as_str().unwrap().to_string();
    let signature = alloy::hex::decode(payload["signature"].as_str().unwrap()).unwrap();
    transferWithAuthorizationCall {
        from: field("from").parse().unwrap(),
        to: field("to").parse().unwrap(),
        value: field("value").parse().unwrap(),
        validAfter: field("validAfter").parse().unwrap(),
        validBefore: field("validBefore").parse().unwrap(),
        nonce: field("nonce").parse().unwrap(),
        v: signature[64],
        r: B256::from_slice(&signature[..32]),
        s: B256::from_slice(&signature[32..64]),
    }
}

/// The EIP-712 domain Permit2 signatures are made in on this chain.
pub fn permit2_domain() -> alloy::sol_types::Eip712Domain {
    alloy::sol_types::eip712_domain! {
        name: "Permit2",
        chain_id: CHAIN_ID,
        verifying_contract: x402_proto::upto_evm::PERMIT2,
    }
}

/// An anvil process (chain id 84532, as Base Sepolia, automining) under `sh`, which stops it when its stdin
/// closes: when this is dropped, and also when the test binary ends, however it ends (the shared anvil is never
/// dropped, and nothing runs at a process's exit to stop it otherwise).
struct Anvil {
    rpc_url: String,
    shell: Child,
    stdin: Option<ChildStdin>,
}

impl Anvil {
    fn start(program: &Path, port: u16) -> Anvil {
        let mut shell = Command::new("/bin/sh")
            .args(["-c", r#""$@" & read -r _; kill $!; wait"#, "sh"])
            .arg(program)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--chain-id", &CHAIN_ID.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("/bin/sh runs anvil");
        let stdout = shell.stdout.take().expect("piped stdout");
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        // Reads the bound port, then keeps draining anvil's log so that it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("Listening on ") {
                    let _ = port_tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = port_rx.recv_timeout(Duration::from_secs(30)).expect("anvil started");
        Anvil { rpc_url: format!("http://{addr}"), stdin: shell.stdin.take(), shell }
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        drop(self.stdin.take());
        // Returns once anvil has exited and its port is free again.
        let _ = self.shell.wait();
    }
}

/// Blocks on an interval (`Chain::keep_mining`), until dropped.
pub struct Mining(tokio::task::JoinHandle<()>);

impl Drop for Mining {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct Chain {
    pub rpc_url: String,
    pub token: Address,
    pub provider: RootProvider,
    /// Deploys contracts and lands authorizations (anvil signs for it).
    pub deployer: Address,
    /// The reference facilitator's key.
    pub facilitator_key: String,
    /// The gateway's settler key, in `network`.
    settler_key: String,
    /// The anvil stopped when this is dropped; `None` on the shared one.
    own: Option<Anvil>,
}

impl Chain {
    /// This test binary's anvil, started by the first test that asks and stopped when the binary ends, with a
    /// token and accounts of this test's own; `None` when anvil is missing, once the test is reported skipped
    /// (`tools::require`).
    pub async fn shared() -> Option<Chain> {
        static SHARED: OnceLock<Anvil> = OnceLock::new();
        let program = tools::require(tools::anvil())?;
        let rpc_url = SHARED.get_or_init(|| Anvil::start(&program, 0)).rpc_url.clone();
        Some(Chain::on(rpc_url, None).await)
    }

    /// An anvil of this test's own, for a test that stops mining, stops the chain or mines blocks; `None` as
    /// for `shared`.
    pub async fn own() -> Option<Chain> {
        let program = tools::require(tools::anvil())?;
        Some(Chain::start_with(&program, 0).await)
    }

    /// Like `own`, but a missing anvil fails the test (a test that cannot skip yet).
    pub async fn start() -> Chain {
        Chain::start_at(0).await
    }

    /// Like `start`, on a given port (0: the kernel picks), e.g. to bring a stopped chain back.
    pub async fn start_at(port: u16) -> Chain {
        let program = tools::anvil().unwrap_or_else(|missing| panic!("this test needs {missing}"));
        Chain::start_with(&program, port).await
    }

    async fn start_with(program: &Path, port: u16) -> Chain {
        let anvil = Anvil::start(program, port);
        Chain::on(anvil.rpc_url.clone(), Some(anvil)).await
    }

    /// Fresh accounts with ether, and a TestUSDC deployed by the new deployer.
    async fn on(rpc_url: String, own: Option<Anvil>) -> Chain {
        let provider = x402_gateway::chain::connect(&rpc_url.parse().unwrap(), Duration::from_secs(10));
        let (deployer, settler, facilitator) =
            (PrivateKeySigner::random(), PrivateKeySigner::random(), PrivateKeySigner::random());
        for account in [&deployer, &settler, &facilitator] {
            let ether = U256::from(1_000u64) * U256::from(10u64).pow(U256::from(18u64));
            let _: serde_json::Value =
                provider.raw_request("anvil_setBalance".into(), (account.address(), ether)).await.unwrap();
        }
        let _: serde_json::Value =
            provider.raw_request("anvil_impersonateAccount".into(), (deployer.address(),)).await.unwrap();
        let key = |signer: &PrivateKeySigner| alloy::hex::encode_prefixed(signer.to_bytes());
        let mut chain = Chain {
            rpc_url,
            token: Address::ZERO,
            provider,
            deployer: deployer.address(),
            facilitator_key: key(&facilitator),
            settler_key: key(&settler),
            own,
        };
        chain.token = chain.deploy("TestUSDC").await;
        chain
    }

    /// The shared anvil (as `shared`) with what `upto` payments settle through, at their canonical addresses: the
    /// real Permit2, its runtime code taken from the npm package, and the repository's `x402UptoPermit2Proxy`
    /// (`contracts/x402UptoPermit2Proxy.runtime.bin`). Placed with `anvil_setCode`, the same code each time, so the
    /// tests sharing the anvil may all place it. `None` when anvil or the package is missing, once the test is
    /// reported skipped.
    pub async fn shared_with_permit2() -> Option<Chain> {
        let permit2 = tools::require_permit2()?;
        let chain = Chain::shared().await?;
        chain.set_code(x402_proto::upto_evm::PERMIT2, permit2).await;
        let path = "contracts/x402UptoPermit2Proxy.runtime.bin";
        let proxy =
            alloy::hex::decode(std::fs::read_to_string(super::repo_path(path)).expect(path).trim()).expect(path);
        chain.set_code(x402_proto::upto_evm::UPTO_PROXY, proxy).await;
        // Its reentrancy guard as a deployment's constructor leaves it (not entered), so that gas is as on a real
        // chain from the first settlement on.
        let (slot, not_entered) = (B256::ZERO, B256::from(U256::from(1)));
        let _: serde_json::Value = chain
            .provider
            .raw_request("anvil_setStorageAt".into(), (x402_proto::upto_evm::UPTO_PROXY, slot, not_entered))
            .await
            .unwrap();
        chain.check_permit2_domain().await;
        Some(chain)
    }

    async fn set_code(&self, at: Address, code: Vec<u8>) {
        let code = alloy::hex::encode_prefixed(code);
        let _: serde_json::Value = self.provider.raw_request("anvil_setCode".into(), (at, code)).await.unwrap();
    }

    /// Permit2's runtime code carries immutables from the deployment it was taken from: the chain id and domain
    /// separator it cached there (chain 31337, another address). On any other chain id it computes the separator
    /// from `block.chainid` and its own address, as on a real chain; on 31337 it would answer the cached one,
    /// and every signature would fail. Checked, so that such a failure says why.
    async fn check_permit2_domain(&self) {
        use alloy::sol_types::SolCall;
        sol! { function DOMAIN_SEPARATOR() external view returns (bytes32); }
        let call = TransactionRequest::default()
            .to(x402_proto::upto_evm::PERMIT2)
            .input(Bytes::from(DOMAIN_SEPARATORCall {}.abi_encode()).into());
        let answer = self.provider.call(call).await.unwrap();
        let separator = DOMAIN_SEPARATORCall::abi_decode_returns(&answer).unwrap();
        let expected = permit2_domain().separator();
        assert_eq!(separator, expected, "Permit2's domain separator on chain {CHAIN_ID} (31337 is known to be wrong)");
    }

    /// The settler key of `network`, for a test that builds a settler itself.
    pub fn settler(&self) -> PrivateKeySigner {
        self.settler_key.parse().unwrap()
    }

    /// The private key of a fresh account with ether: another facilitator's signer.
    pub async fn funded_key(&self) -> String {
        let signer = PrivateKeySigner::random();
        let ether = U256::from(1_000u64) * U256::from(10u64).pow(U256::from(18u64));
        let _: serde_json::Value =
            self.provider.raw_request("anvil_setBalance".into(), (signer.address(), ether)).await.unwrap();
        alloy::hex::encode_prefixed(signer.to_bytes())
    }

    /// Deploys `contracts/{name}.bin` from the deployer account.
    pub async fn deploy(&self, name: &str) -> Address {
        let path = format!("contracts/{name}.bin");
        let hex = std::fs::read_to_string(super::repo_path(&path)).expect(&path);
        let code: Bytes = alloy::hex::decode(hex.trim()).expect("bytecode hex").into();
        let deploy = TransactionRequest::default().from(self.deployer).with_deploy_code(code);
        let receipt = self.provider.send_transaction(deploy).await.unwrap().get_receipt().await.unwrap();
        receipt.contract_address.expect("deployed")
    }

    pub fn port(&self) -> u16 {
        self.rpc_url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port")
    }

    pub async fn mint(&self, to: Address, amount: u64) {
        use alloy::sol_types::SolCall;
        let call = mintCall { to, amount: U256::from(amount) }.abi_encode();
        let tx = TransactionRequest::default().from(self.deployer).to(self.token).input(Bytes::from(call).into());
        let receipt = self.provider.send_transaction(tx).await.unwrap().get_receipt().await.unwrap();
        assert!(receipt.status(), "mint");
    }

    /// Someone else (the deployer) submits an `exact` payload's authorization; returns the transaction.
    pub async fn land(&self, payload: &serde_json::Value) -> B256 {
        use alloy::sol_types::SolCall;
        let tx = TransactionRequest::default()
            .from(self.deployer)
            .with_to(self.token)
            .with_input(transfer_call(payload).abi_encode());
        let receipt = self.provider.send_transaction(tx).await.unwrap().get_receipt().await.unwrap();
        assert!(receipt.status(), "the authorization landed");
        receipt.transaction_hash
    }

    /// Mines a block every `interval` besides each transaction's, until the returned task is dropped: anvil's
    /// automine makes no block unless a transaction comes, and a client that found no receipt at its first look
    /// (viem) waits for a new block to look again, as on a real chain.
    pub fn keep_mining(&self, interval: Duration) -> Mining {
        let provider = self.provider.clone();
        Mining(tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let _: Result<serde_json::Value, _> = provider.raw_request("anvil_mine".into(), (U256::from(1),)).await;
            }
        }))
    }

    /// Mines `blocks` empty blocks at once (`anvil_mine`).
    pub async fn mine(&self, blocks: u64) {
        let _: serde_json::Value = self.provider.raw_request("anvil_mine".into(), (U256::from(blocks),)).await.unwrap();
    }

    pub async fn balance(&self, who: Address) -> U256 {
        x402_gateway::chain::balance_of(&self.provider, self.token, who).await.unwrap()
    }

    /// `[networks."eip155:84532"]` for this chain: TestUSDC as USDC, and this test's settler key.
    pub fn network(&self) -> Network {
        let usdc = toml::Table::from_iter([
            ("address".into(), self.token.to_string().into()),
            ("decimals".into(), 6.into()),
            ("eip712_name".into(), "USD Coin".into()),
            ("eip712_version".into(), "2".into()),
        ]);
        let assets = toml::Table::from_iter([("USDC".into(), toml::Value::Table(usdc))]);
        let network = toml::Table::from_iter([
            ("rpc_url".into(), self.rpc_url.clone().into()),
            ("settler_key".into(), self.settler_key.clone().into()),
            ("assets".into(), toml::Value::Table(assets)),
        ]);
        Network::new(&format!("eip155:{CHAIN_ID}"), network)
    }

    /// `network` as TOML text.
    pub fn network_toml(&self) -> String {
        self.network().toml()
    }
}
