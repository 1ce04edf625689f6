//! The EVM networks and stablecoins the gateway knows without configuration (values from the x402 reference
//! tables), extended or overridden by `[networks."eip155:N"]` in `gateway.toml`.

use alloy_primitives::{address, Address};

#[derive(Clone, PartialEq, Eq)]
pub struct Network {
    pub chain_id: u64,
    /// CAIP-2 identifier, `eip155:<chain id>`: what x402 v2 puts on the wire.
    pub caip2: String,
    /// The x402 v1 name (`base-sepolia`), when v1 clients know this chain.
    pub v1_name: Option<String>,
    pub rpc_url: Option<String>,
    pub assets: Vec<Asset>,
}

impl std::fmt::Debug for Network {
    // The RPC URL often carries a node provider's key: only whether there is one is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("chain_id", &self.chain_id)
            .field("v1_name", &self.v1_name)
            .field("rpc_url", &self.rpc_url.as_ref().map(|_| "<redacted>"))
            .field("assets", &self.assets)
            .finish()
    }
}

/// An EIP-3009 token. `eip712_name`/`eip712_version` must equal the token's on-chain `name()`/`version()`,
/// since they feed its domain separator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asset {
    pub symbol: String,
    pub address: Address,
    pub decimals: u8,
    pub eip712_name: String,
    pub eip712_version: String,
    /// Whether the token has EIP-2612 `permit`: then `upto` offers of it declare gas sponsoring, so that a buyer
    /// who never approved Permit2 can pay with a permit instead of a transaction.
    pub eip2612: bool,
}

/// (chain id, v1 name) as the TypeScript and Go SDKs map them.
const V1_NAMES: &[(u64, &str)] = &[
    (1, "ethereum"),
    (11155111, "sepolia"),
    (8453, "base"),
    (84532, "base-sepolia"),
    (137, "polygon"),
    (80002, "polygon-amoy"),
    (43114, "avalanche"),
    (43113, "avalanche-fuji"),
    (2741, "abstract"),
    (11124, "abstract-testnet"),
    (1329, "sei"),
    (1328, "sei-testnet"),
    (4689, "iotex"),
    (3338, "peaq"),
    (1514, "story"),
    (41923, "educhain"),
    (324705682, "skale-base-sepolia"),
    (4326, "megaeth"),
    (143, "monad"),
    (988, "stable"),
    (2201, "stable-testnet"),
];

/// (chain id, USDC address, EIP-712 name). Every entry is 6 decimals, EIP-712 version "2".
const USDC: &[(u64, Address, &str)] = &[
    (8453, address!("833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"), "USD Coin"),
    (84532, address!("036CbD53842c5426634e7929541eC2318f3dCF7e"), "USDC"),
    (137, address!("3c499c542cEF5E3811e1192ce70d8cC03d5c3359"), "USD Coin"),
    (80002, address!("41E94Eb019C0762f9Bfcf9Fb1E58725BfB0e7582"), "USDC"),
    (42161, address!("af88d065e77c8cC2239327C5EDb3A432268e5831"), "USD Coin"),
    (421614, address!("75faf114eafb1BDbe2F0316DF893fd58CE46AA4d"), "USD Coin"),
    (43114, address!("B97EF9Ef8734C71904D8002F8b6Bc66Dd9c48a6E"), "USD Coin"),
    (43113, address!("5425890298aed601595a70AB815c96711a31Bc65"), "USD Coin"),
    (1, address!("A0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"), "USD Coin"),
    (143, address!("754704Bc059F8C67012fEd69BC8A327a5aafb603"), "USDC"),
];

/// Chains whose tokens come from faucets (the testnets of the tables above).
const TESTNETS: &[u64] = &[11155111, 84532, 80002, 421614, 43113, 11124, 1328, 324705682, 2201];
/// The default chain ids of anvil (31337) and hardhat/ganache (1337): a chain on the operator's own machine.
const LOCAL_CHAINS: &[u64] = &[31337, 1337];

/// The accounts anvil and hardhat fund by default, from the public mnemonic "test test ... junk": their
/// private keys are published, so anyone can spend what is paid to them.
const DEVELOPMENT_ACCOUNTS: [Address; 20] = [
    address!("f39Fd6e51aad88F6F4ce6aB8827279cffFb92266"),
    address!("70997970C51812dc3A010C7d01b50e0d17dc79C8"),
    address!("3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
    address!("90F79bf6EB2c4f870365E785982E1f101E93b906"),
    address!("15d34AAf54267DB7D7c367839AAf71A00a2C6A65"),
    address!("9965507D1a55bcC2695C58ba16FB37d819B0A4dc"),
    address!("976EA74026E726554dB657fA54763abd0C3a0aa9"),
    address!("14dC79964da2C08b23698B3D3cc7Ca32193d9955"),
    address!("23618e81E3f5cdF7f54C3d65f7FBc0aBf5B21E8f"),
    address!("a0Ee7A142d267C1f36714E4a8F75612F20a79720"),
    address!("Bcd4042DE499D14e55001CcbB24a551F3b954096"),
    address!("71bE63f3384f5fb98995898A86B02Fb2426c5788"),
    address!("FABB0ac9d68B0B445fB7357272Ff202C5651694a"),
    address!("1CBd3b2770909D4e10f157cABC84C7264073C9Ec"),
    address!("dF3e18d64BC6A983f673Ab319CCaE4f1a57C7097"),
    address!("cd3B766CCDd6AE721141F452C550Ca635964ce71"),
    address!("2546BcD3c84621e976D8185a91A922aE77ECEc30"),
    address!("bDA5747bFD65F08deb54cb465eB87D40e51B197E"),
    address!("dD2FD4581271e230360230F9337D5c0430Bf44C0"),
    address!("8626f6940E2eb28930eFb4CeF49B2d1F2C9C1199"),
];

/// What the money on a chain is worth to whoever holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    /// Real money. Any chain not known to be a test chain counts as one: nothing says its money is not real.
    Mainnet,
    Testnet,
    /// A development chain such as anvil's.
    Local,
}

pub fn chain_kind(chain_id: u64) -> ChainKind {
    if TESTNETS.contains(&chain_id) {
        ChainKind::Testnet
    } else if LOCAL_CHAINS.contains(&chain_id) {
        ChainKind::Local
    } else {
        ChainKind::Mainnet
    }
}

/// Which development account (0 for the first) `address` is, if it is one of those with a published key.
pub fn development_account(address: Address) -> Option<usize> {
    DEVELOPMENT_ACCOUNTS.iter().position(|a| *a == address)
}

/// Parses `eip155:<id>` or a v1 name into a chain id.
pub fn chain_id_of(name: &str) -> Option<u64> {
    match name.strip_prefix("eip155:") {
        Some(id) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => id.parse().ok(),
        Some(_) => None,
        None => V1_NAMES.iter().find(|(_, v1)| *v1 == name).map(|(id, _)| *id),
    }
}

/// The built-in description of a chain: its v1 name and USDC, where the reference tables have them.
pub fn builtin(chain_id: u64) -> Network {
    let assets = USDC
        .iter()
        .filter(|(id, _, _)| *id == chain_id)
        .map(|(_, address, name)| Asset {
            symbol: "USDC".to_string(),
            address: *address,
            decimals: 6,
            eip712_name: name.to_string(),
            eip712_version: "2".to_string(),
            // Circle's USDC has `permit` on every chain.
            eip2612: true,
        })
        .collect();
    Network {
        chain_id,
        caip2: format!("eip155:{chain_id}"),
        v1_name: V1_NAMES.iter().find(|(id, _)| *id == chain_id).map(|(_, n)| n.to_string()),
        rpc_url: None,
        assets,
    }
}

impl Network {
    /// An asset by symbol (case-insensitive) or by 0x address.
    pub fn asset(&self, symbol_or_address: &str) -> Option<&Asset> {
        match symbol_or_address.parse::<Address>() {
            Ok(address) => self.assets.iter().find(|a| a.address == address),
            Err(_) => self.assets.iter().find(|a| a.symbol.eq_ignore_ascii_case(symbol_or_address)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_builtins() {
        assert_eq!(chain_id_of("eip155:84532"), Some(84532));
        assert_eq!(chain_id_of("base-sepolia"), Some(84532));
        assert_eq!(chain_id_of("eip155:"), None);
        assert_eq!(chain_id_of("solana:devnet"), None);
        let base_sepolia = builtin(84532);
        assert_eq!(base_sepolia.v1_name.as_deref(), Some("base-sepolia"));
        let usdc = base_sepolia.asset("usdc").unwrap();
        assert_eq!(usdc.eip712_name, "USDC");
        assert_eq!(base_sepolia.asset("0x036CbD53842c5426634e7929541eC2318f3dCF7e"), Some(usdc));
        assert!(builtin(31337).assets.is_empty());
    }

    #[test]
    fn chain_kinds_and_development_accounts() {
        assert_eq!(chain_kind(8453), ChainKind::Mainnet);
        assert_eq!(chain_kind(84532), ChainKind::Testnet);
        assert_eq!(chain_kind(31337), ChainKind::Local);
        assert_eq!(chain_kind(10), ChainKind::Mainnet, "an unknown chain may carry real money");
        assert_eq!(development_account(address!("90F79bf6EB2c4f870365E785982E1f101E93b906")), Some(3));
        assert_eq!(development_account(Address::repeat_byte(0x11)), None);
    }

    #[test]
    fn debug_output_hides_the_rpc_url() {
        let network = Network { rpc_url: Some("https://node.example/v2/SECRET-KEY".into()), ..builtin(8453) };
        let shown = format!("{network:?}");
        assert!(!shown.contains("SECRET-KEY") && shown.contains("redacted"), "{shown}");
    }
}
