//! Chain access with alloy: a provider per RPC URL, the EIP-3009 token's calls, and the settlement
//! transaction. Nothing else in the gateway talks to a node.

mod transport;

use alloy::consensus::{SignableTransaction, TxEip1559, TxEnvelope};
use alloy::eips::Encodable2718;
use alloy::network::TxSignerSync;
use alloy::primitives::{Address, Bytes, TxKind, B256, U256};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::client::RpcClient;
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;
use alloy::sol_types::{SolCall, SolEvent};
use alloy::transports::TransportError;
use std::time::Duration;
use x402_proto::exact_evm::VerifiedAuthorization;

pub use transport::HttpTransport;

sol! {
    /// The parts of an EIP-3009 token (USDC's FiatToken v2) the gateway uses.
    interface Eip3009Token {
        function transferWithAuthorization(address from, address to, uint256 value, uint256 validAfter, uint256 validBefore, bytes32 nonce, uint8 v, bytes32 r, bytes32 s) external;
        function authorizationState(address authorizer, bytes32 nonce) external view returns (bool);
        function balanceOf(address account) external view returns (uint256);
        event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce);
    }

    /// Multicall3's batch entry point: each call may fail without reverting the others.
    interface Multicall3 {
        struct Call3 {
            address target;
            bool allowFailure;
            bytes callData;
        }
        struct Result {
            bool success;
            bytes returnData;
        }
        function aggregate3(Call3[] calldata calls) external payable returns (Result[] memory returnData);
    }
}

/// Generous for `transferWithAuthorization` (about 60k to 110k gas on USDC deployments); unused gas is not paid.
pub const SETTLE_GAS_LIMIT: u64 = 200_000;
/// An `upto` settlement through the proxy and Permit2, with the buyer's EIP-2612 permit at most (about 100k to
/// 175k gas on a test token; more on a real USDC deployment), as the reference facilitator allows it.
pub const UPTO_SETTLE_GAS_LIMIT: u64 = 300_000;
/// Per authorization in a batch, where the transaction's base cost is paid once.
const BATCHED_SETTLE_GAS: u64 = 100_000;

pub fn connect(rpc_url: &http::Uri, timeout: Duration) -> RootProvider {
    let is_local = rpc_url.host().is_some_and(|h| h == "127.0.0.1" || h == "localhost" || h == "[::1]");
    RootProvider::new(RpcClient::new(HttpTransport::new(rpc_url.clone(), timeout), is_local))
}

/// A provider for every network that has an `rpc_url`, by chain id.
pub fn providers<'a>(
    networks: impl IntoIterator<Item = &'a x402_proto::networks::Network>,
) -> std::collections::HashMap<u64, RootProvider> {
    networks
        .into_iter()
        .filter_map(|n| Some((n.chain_id, connect(&n.rpc_url.as_deref()?.parse().ok()?, Duration::from_secs(15)))))
        .collect()
}

/// Calldata of `transferWithAuthorization(..., v, r, s)` for a verified authorization.
pub fn transfer_calldata(auth: &VerifiedAuthorization) -> Bytes {
    let signature = &auth.signature;
    Eip3009Token::transferWithAuthorizationCall {
        from: auth.from,
        to: auth.to,
        value: auth.value,
        validAfter: auth.valid_after,
        validBefore: auth.valid_before,
        nonce: auth.nonce,
        // FiatToken's ecrecover wants 27/28, whatever form the buyer sent.
        v: 27 + u8::from(signature.v()),
        r: signature.r().into(),
        s: signature.s().into(),
    }
    .abi_encode()
    .into()
}

/// One `aggregate3` call running each `(token, calldata)` on its own: a failing authorization never sinks the
/// others. Returns the calldata and a gas limit for it.
pub fn batch_calldata(calls: impl IntoIterator<Item = (Address, Bytes)>) -> (Bytes, u64) {
    let calls: Vec<Multicall3::Call3> = calls
        .into_iter()
        .map(|(target, input)| Multicall3::Call3 { target, allowFailure: true, callData: input })
        .collect();
    let gas = SETTLE_GAS_LIMIT + BATCHED_SETTLE_GAS * calls.len() as u64;
    (Multicall3::aggregate3Call { calls }.abi_encode().into(), gas)
}

/// Whether this transaction moved this authorization's money: its token logged `AuthorizationUsed(authorizer,
/// nonce)`, or it was a successful call straight to the token (which can only have been this transfer, even on
/// a token that logs no such event). In a batch, the transaction succeeding says nothing of each call.
pub fn used_authorization(receipt: &TransactionReceipt, token: Address, authorizer: Address, nonce: B256) -> bool {
    let logged = receipt.inner.logs().iter().any(|log| {
        log.address() == token
            && log.topics()
                == [Eip3009Token::AuthorizationUsed::SIGNATURE_HASH, authorizer.into_word(), nonce].as_slice()
    });
    receipt.status() && (logged || receipt.to == Some(token))
}

/// What the chain says about an authorization that failed simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimulationFailure {
    NonceUsed,
    InsufficientBalance,
    Other,
}

/// Whether `input` sent to `target` by `settler` would succeed now (`eth_call`). `Err`: the node could not say.
pub async fn would_succeed(
    provider: &RootProvider,
    settler: Address,
    target: Address,
    input: Bytes,
) -> Result<bool, TransportError> {
    let call = TransactionRequest::default().from(settler).to(target).input(input.into());
    match provider.call(call).await {
        Ok(_) => Ok(true),
        Err(err) if err.as_error_resp().is_some() => Ok(false),
        Err(err) => Err(err),
    }
}

/// `would_succeed` for each `(target, calldata)`, in one `eth_call` through `multicall`'s `aggregate3` with
/// each call allowed to fail alone, as in a batched settlement.
pub async fn would_each_succeed(
    provider: &RootProvider,
    settler: Address,
    multicall: Address,
    calls: Vec<(Address, Bytes)>,
) -> Result<Vec<bool>, TransportError> {
    let count = calls.len();
    let (input, gas) = batch_calldata(calls);
    let request = TransactionRequest::default().from(settler).to(multicall).input(input.into()).gas_limit(gas);
    // A multicall address without code answers `0x`, which does not decode: an error, never a pass.
    let results = Multicall3::aggregate3Call::abi_decode_returns(&provider.call(request).await?)
        .map_err(TransportError::local_usage)?;
    if results.len() != count {
        return Err(TransportError::local_usage_str("the multicall answered for a different number of calls"));
    }
    Ok(results.into_iter().map(|result| result.success).collect())
}

/// Why an authorization would not settle, in x402's terms, from the token's own records.
pub async fn diagnose(
    provider: &RootProvider,
    token: Address,
    auth: &VerifiedAuthorization,
) -> Result<SimulationFailure, TransportError> {
    let used = view(provider, token, Eip3009Token::authorizationStateCall { authorizer: auth.from, nonce: auth.nonce })
        .await?;
    if used {
        return Ok(SimulationFailure::NonceUsed);
    }
    let balance = view(provider, token, Eip3009Token::balanceOfCall { account: auth.from }).await?;
    Ok(if balance < auth.value { SimulationFailure::InsufficientBalance } else { SimulationFailure::Other })
}

pub async fn view<C: SolCall>(provider: &RootProvider, token: Address, call: C) -> Result<C::Return, TransportError> {
    let request = TransactionRequest::default().to(token).input(Bytes::from(call.abi_encode()).into());
    let output = provider.call(request).await?;
    C::abi_decode_returns(&output).map_err(TransportError::local_usage)
}

pub async fn balance_of(provider: &RootProvider, token: Address, account: Address) -> Result<U256, TransportError> {
    view(provider, token, Eip3009Token::balanceOfCall { account }).await
}

/// A signed EIP-1559 transaction calling `to` with `input`, ready for `eth_sendRawTransaction`.
pub struct TxParams {
    pub chain_id: u64,
    pub nonce: u64,
    pub max_fee_per_gas: u128,
    pub max_priority_fee_per_gas: u128,
}

pub fn sign_call(
    signer: &PrivateKeySigner,
    to: Address,
    input: Bytes,
    gas_limit: u64,
    params: &TxParams,
) -> Result<Vec<u8>, alloy::signers::Error> {
    let mut tx = TxEip1559 {
        chain_id: params.chain_id,
        nonce: params.nonce,
        gas_limit,
        max_fee_per_gas: params.max_fee_per_gas,
        max_priority_fee_per_gas: params.max_priority_fee_per_gas,
        to: TxKind::Call(to),
        value: U256::ZERO,
        access_list: Default::default(),
        input,
    };
    let signature = signer.sign_transaction_sync(&mut tx)?;
    Ok(TxEnvelope::from(tx.into_signed(signature)).encoded_2718())
}

/// Fee caps for the next transaction: the node's estimate, with headroom so a rising base fee does not
/// strand it.
pub async fn fees(provider: &RootProvider) -> Result<(u128, u128), TransportError> {
    let estimate = provider.estimate_eip1559_fees().await?;
    Ok((estimate.max_fee_per_gas.saturating_mul(2), estimate.max_priority_fee_per_gas))
}
