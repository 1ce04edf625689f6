//! A real local chain for the tests: `anvil` (see `tools::anvil` for where it is found) on a port the kernel
//! picks, with the repository's EIP-3009 TestUSDC deployed. Dropping the `Chain` stops anvil.

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, Bytes, B256, U256};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::types::TransactionRequest;
use alloy::sol;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Anvil's deterministic dev accounts ("test test ... junk"): #0 deploys, #2 pays gas for settlements.
pub const DEPLOYER: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";
pub const SETTLER_KEY: &str = "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a";
pub const FACILITATOR_KEY: &str = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6";
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

pub struct Chain {
    pub rpc_url: String,
    pub token: Address,
    pub provider: RootProvider,
    anvil: Child,
}

impl Drop for Chain {
    fn drop(&mut self) {
        let _ = self.anvil.kill();
        let _ = self.anvil.wait();
    }
}

impl Chain {
    /// Starts anvil (chain id 84532, as Base Sepolia, automining) and deploys TestUSDC; `None` when anvil is
    /// missing, once the test is reported skipped (`tools::require`).
    pub async fn own() -> Option<Chain> {
        let anvil = super::tools::require(super::tools::anvil())?;
        Some(Chain::start_with(&anvil, 0).await)
    }

    /// Like `own`, but a missing anvil fails the test (a test that cannot skip yet).
    pub async fn start() -> Chain {
        Chain::start_at(0).await
    }

    /// Like `start`, on a given port (0: the kernel picks), e.g. to bring a stopped chain back.
    pub async fn start_at(port: u16) -> Chain {
        let anvil = super::tools::anvil().unwrap_or_else(|missing| panic!("this test needs {missing}"));
        Chain::start_with(&anvil, port).await
    }

    async fn start_with(anvil: &std::path::Path, port: u16) -> Chain {
        let mut anvil = Command::new(anvil)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--chain-id", &CHAIN_ID.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("anvil starts");
        let stdout = anvil.stdout.take().expect("piped stdout");
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
        let rpc_url = format!("http://{addr}");
        let provider = x402_gateway::chain::connect(&rpc_url.parse().unwrap(), Duration::from_secs(10));
        let mut chain = Chain { rpc_url, token: Address::ZERO, provider, anvil };
        chain.token = chain.deploy("TestUSDC").await;
        chain
    }

    /// Deploys `contracts/{name}.bin` from the deployer account.
    pub async fn deploy(&self, name: &str) -> Address {
        let path = format!("contracts/{name}.bin");
        let hex = std::fs::read_to_string(super::repo_path(&path)).expect(&path);
        let code: Bytes = alloy::hex::decode(hex.trim()).expect("bytecode hex").into();
        let deploy = TransactionRequest::default().from(DEPLOYER.parse().unwrap()).with_deploy_code(code);
        let receipt = self.provider.send_transaction(deploy).await.unwrap().get_receipt().await.unwrap();
        receipt.contract_address.expect("deployed")
    }

    pub fn port(&self) -> u16 {
        self.rpc_url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port")
    }

    pub async fn mint(&self, to: Address, amount: u64) {
        use alloy::sol_types::SolCall;
        let call = mintCall { to, amount: U256::from(amount) }.abi_encode();
        let tx = TransactionRequest::default()
            .from(DEPLOYER.parse().unwrap())
            .to(self.token)
            .input(Bytes::from(call).into());
        let receipt = self.provider.send_transaction(tx).await.unwrap().get_receipt().await.unwrap();
        assert!(receipt.status(), "mint");
    }

    /// Someone else (anvil's first account) submits an `exact` payload's authorization; returns the transaction.
    pub async fn land(&self, payload: &serde_json::Value) -> B256 {
        use alloy::sol_types::SolCall;
        let tx = TransactionRequest::default()
            .from(DEPLOYER.parse().unwrap())
            .with_to(self.token)
            .with_input(transfer_call(payload).abi_encode());
        let receipt = self.provider.send_transaction(tx).await.unwrap().get_receipt().await.unwrap();
        assert!(receipt.status(), "the authorization landed");
        receipt.transaction_hash
    }

    /// Mines `blocks` empty blocks at once (`anvil_mine`).
    pub async fn mine(&self, blocks: u64) {
        let _: serde_json::Value = self.provider.raw_request("anvil_mine".into(), (U256::from(blocks),)).await.unwrap();
    }

    pub async fn balance(&self, who: Address) -> U256 {
        x402_gateway::chain::balance_of(&self.provider, self.token, who).await.unwrap()
    }

    /// `[networks]` for this chain: TestUSDC as USDC, and the gateway's settler key.
    pub fn network_toml(&self) -> String {
        format!(
            r#"
[networks."eip155:{CHAIN_ID}"]
rpc_url = "{}"
settler_key = "{SETTLER_KEY}"
[networks."eip155:{CHAIN_ID}".assets.USDC]
address = "{}"
decimals = 6
eip712_name = "USD Coin"
eip712_version = "2"
"#,
            self.rpc_url, self.token
        )
    }
}
