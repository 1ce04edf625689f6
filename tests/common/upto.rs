//! `upto` payments signed here, as the official clients sign them: a Permit2 `PermitWitnessTransferFrom` of the
//! offer's ceiling to the `x402UptoPermit2Proxy`, with the witness `{to, facilitator, validAfter}`.
#![allow(dead_code)]

use super::chain::{self, Chain};
use super::pay::{fresh_nonce, now};
use alloy::primitives::{Address, Bytes, U256};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::signers::SignerSync;
use alloy::sol;
use alloy::sol_types::{SolCall, SolStruct};
use serde_json::{json, Value};
use x402_proto::upto_evm::{PermitWitnessTransferFrom, TokenPermissions, Witness, PERMIT2, UPTO_PROXY};

sol! {
    function approve(address spender, uint256 value) external returns (bool);
}

/// The buyer's one-time `approve(Permit2, max)`, from its own account (anvil signs for it; given the ether).
pub async fn approve_permit2(chain: &Chain, buyer: Address) {
    let rpc = &chain.provider;
    let ether = U256::from(10u64).pow(U256::from(18));
    let _: Value = rpc.raw_request("anvil_setBalance".into(), (buyer, ether)).await.unwrap();
    let _: Value = rpc.raw_request("anvil_impersonateAccount".into(), (buyer,)).await.unwrap();
    let input = approveCall { spender: PERMIT2, value: U256::MAX }.abi_encode();
    let tx = TransactionRequest::default().from(buyer).to(chain.token).input(Bytes::from(input).into());
    assert!(rpc.send_transaction(tx).await.unwrap().get_receipt().await.unwrap().status(), "approve");
    // Back to an account with no ether: the buyer pays no gas for its payments.
    let _: Value = rpc.raw_request("anvil_setBalance".into(), (buyer, U256::ZERO)).await.unwrap();
}

/// The buyer takes Permit2's allowance back (`approve(Permit2, 0)`).
pub async fn revoke_permit2(chain: &Chain, buyer: Address) {
    let rpc = &chain.provider;
    let _: Value =
        rpc.raw_request("anvil_setBalance".into(), (buyer, U256::from(10u64).pow(U256::from(18)))).await.unwrap();
    let _: Value = rpc.raw_request("anvil_impersonateAccount".into(), (buyer,)).await.unwrap();
    let input = approveCall { spender: PERMIT2, value: U256::ZERO }.abi_encode();
    let tx = TransactionRequest::default().from(buyer).to(chain.token).input(Bytes::from(input).into());
    assert!(rpc.send_transaction(tx).await.unwrap().get_receipt().await.unwrap().status(), "revoke");
}

/// What a buyer signs; each field may be bent to test the gateway's checks.
pub struct Permit {
    pub token: Address,
    pub ceiling: U256,
    pub spender: Address,
    pub pay_to: Address,
    pub facilitator: Address,
    pub deadline: u64,
    pub valid_after: u64,
    pub nonce: U256,
}

impl Permit {
    /// What the official client signs for `accepted` (an `upto` offer of a 402).
    pub fn for_offer(accepted: &Value) -> Permit {
        let address = |field: &str| accepted.pointer(field).and_then(Value::as_str).unwrap().parse().unwrap();
        Permit {
            token: address("/asset"),
            ceiling: accepted["amount"].as_str().unwrap().parse().unwrap(),
            spender: UPTO_PROXY,
            pay_to: address("/payTo"),
            facilitator: address("/extra/facilitatorAddress"),
            deadline: now() + accepted["maxTimeoutSeconds"].as_u64().unwrap(),
            valid_after: 0,
            nonce: U256::from_be_bytes(fresh_nonce().0),
        }
    }

    /// The scheme payload, signed by `buyer`.
    pub fn sign(&self, buyer: &PrivateKeySigner) -> Value {
        let message = PermitWitnessTransferFrom {
            permitted: TokenPermissions { token: self.token, amount: self.ceiling },
            spender: self.spender,
            nonce: self.nonce,
            deadline: U256::from(self.deadline),
            witness: Witness {
                to: self.pay_to,
                facilitator: self.facilitator,
                validAfter: U256::from(self.valid_after),
            },
        };
        let signature = buyer.sign_hash_sync(&message.eip712_signing_hash(&chain::permit2_domain())).unwrap();
        json!({
            "signature": signature.to_string(),
            "permit2Authorization": {
                "permitted": { "token": self.token.to_string(), "amount": self.ceiling.to_string() },
                "from": buyer.address().to_string(),
                "spender": self.spender.to_string(),
                "nonce": self.nonce.to_string(),
                "deadline": self.deadline.to_string(),
                "witness": {
                    "to": self.pay_to.to_string(),
                    "facilitator": self.facilitator.to_string(),
                    "validAfter": self.valid_after.to_string(),
                },
            },
        })
    }
}
