//! One transaction queue per settler key: it alone assigns the account's nonces, so concurrent settlements
//! never collide. It only signs and broadcasts; waiting for receipts happens in the callers, concurrently.

use crate::chain::{self, TxParams};
use alloy::primitives::{keccak256, Address, Bytes, B256};
use alloy::providers::{Provider, RootProvider};
use alloy::signers::local::PrivateKeySigner;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Fee estimates are reused this long, saving a round trip per settlement.
const FEE_CACHE: Duration = Duration::from_secs(3);
/// Broadcast attempts for one transaction when the node refuses it (typically a stale nonce).
const SEND_ATTEMPTS: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The node refused the transaction: it was not broadcast.
    #[error("the node refused the settlement transaction: {0}")]
    Refused(String),
    /// The node could not be asked, or did not answer: the transaction may or may not have been broadcast.
    #[error("the settlement transaction {0} may not have reached the node")]
    Unknown(B256),
}

/// Called with each signed transaction's hash before it is broadcast (to record it write-ahead; the last call
/// names the transaction that was sent). An error stops the broadcast.
pub type BeforeBroadcast = Box<dyn Fn(B256) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

enum Message {
    Send {
        to: Address,
        input: Bytes,
        before: Option<BeforeBroadcast>,
        reply: oneshot::Sender<Result<B256, SendError>>,
    },
    /// Forget the cached nonce: a transaction was lost, so the chain must be asked again.
    Resync,
}

#[derive(Clone)]
pub struct TxQueue {
    messages: mpsc::Sender<Message>,
}

impl TxQueue {
    pub fn spawn(provider: RootProvider, signer: PrivateKeySigner, chain_id: u64) -> TxQueue {
        let (messages, inbox) = mpsc::channel(1024);
        tokio::spawn(Worker { provider, signer, chain_id, next_nonce: None, fees: None }.run(inbox));
        TxQueue { messages }
    }

    /// Signs and broadcasts a call; returns its transaction hash once the node has accepted it. `before` runs
    /// inside the queue, between signing and broadcasting, so a caller that goes away cannot split the two.
    pub async fn send(&self, to: Address, input: Bytes, before: Option<BeforeBroadcast>) -> Result<B256, SendError> {
        let (reply, answer) = oneshot::channel();
        self.messages
            .send(Message::Send { to, input, before, reply })
            .await
            .map_err(|_| SendError::Refused("the settlement queue has stopped".into()))?;
        answer.await.map_err(|_| SendError::Refused("the settlement queue has stopped".into()))?
    }

    pub fn resync(&self) {
        let _ = self.messages.try_send(Message::Resync);
    }
}

struct Worker {
    provider: RootProvider,
    signer: PrivateKeySigner,
    chain_id: u64,
    next_nonce: Option<u64>,
    fees: Option<(Instant, (u128, u128))>,
}

impl Worker {
    async fn run(mut self, mut inbox: mpsc::Receiver<Message>) {
        while let Some(message) = inbox.recv().await {
            match message {
                Message::Resync => self.next_nonce = None,
                Message::Send { to, input, before, reply } => {
                    let _ = reply.send(self.broadcast(to, input, before).await);
                }
            }
        }
    }

    async fn broadcast(
        &mut self,
        to: Address,
        input: Bytes,
        before: Option<BeforeBroadcast>,
    ) -> Result<B256, SendError> {
        let mut last_refusal = String::new();
        for _ in 0..SEND_ATTEMPTS {
            let params =
                self.params().await.map_err(|e| SendError::Refused(format!("cannot prepare the transaction: {e}")))?;
            let raw = chain::sign_call(&self.signer, to, input.clone(), &params)
                .map_err(|e| SendError::Refused(format!("cannot sign: {e}")))?;
            let hash = keccak256(&raw);
            if let Some(record) = &before {
                record(hash).await.map_err(SendError::Refused)?;
            }
            match self.provider.send_raw_transaction(&raw).await {
                Ok(_) => {
                    self.next_nonce = Some(params.nonce + 1);
                    return Ok(hash);
                }
                Err(err) if err.as_error_resp().is_some() => {
                    // Most refusals are a stale nonce (another sender, a dropped transaction): ask the chain again.
                    last_refusal = err.to_string();
                    self.next_nonce = None;
                }
                Err(_) => {
                    self.next_nonce = None;
                    return Err(SendError::Unknown(hash));
                }
            }
        }
        Err(SendError::Refused(last_refusal))
    }

    async fn params(&mut self) -> Result<TxParams, alloy::transports::TransportError> {
        let nonce = match self.next_nonce {
            Some(nonce) => nonce,
            None => self.provider.get_transaction_count(self.signer.address()).pending().await?,
        };
        let (max_fee_per_gas, max_priority_fee_per_gas) = match self.fees {
            Some((at, fees)) if at.elapsed() < FEE_CACHE => fees,
            _ => {
                let fees = chain::fees(&self.provider).await?;
                self.fees = Some((Instant::now(), fees));
                fees
            }
        };
        Ok(TxParams { chain_id: self.chain_id, nonce, max_fee_per_gas, max_priority_fee_per_gas })
    }
}
