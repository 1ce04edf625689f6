//! One transaction queue per settler key: it alone assigns the account's nonces, so concurrent settlements
//! never collide. It signs and broadcasts, several transactions in flight at once; waiting for receipts
//! happens in the callers. With batching on, batches form as Nagle's algorithm forms TCP segments: a payment
//! that finds none of the key's transactions in flight goes out at once, alone; the payments that arrive while
//! one is in flight share the next Multicall3 `aggregate3` transaction (each call allowed to fail alone), sent
//! as soon as nothing is in flight any more, the batch is full, or the window of its first payment closes.

use crate::chain::{self, TxParams};
use crate::options::BatchSettings;
use alloy::primitives::{keccak256, Address, Bytes, B256};
use alloy::providers::{Provider, RootProvider};
use alloy::signers::local::PrivateKeySigner;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

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

/// A transaction the node accepted, and the caller's share of it being in flight.
#[derive(Clone)]
pub struct Sent {
    pub hash: B256,
    /// Hold it until the receipt is seen (or given up on): the queue batches behind the transaction meanwhile.
    pub in_flight: Arc<InFlight>,
}

/// One of the queue's transactions in flight, shared by the callers it carries: it has landed, for batching,
/// when the last of them lets go.
pub struct InFlight {
    count: Arc<watch::Sender<usize>>,
}

impl InFlight {
    fn start(count: &Arc<watch::Sender<usize>>) -> Arc<InFlight> {
        count.send_modify(|n| *n += 1);
        Arc::new(InFlight { count: count.clone() })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Called with each signed transaction's hash before it is broadcast (to record it write-ahead; the last call
/// names the transaction that was sent). An error leaves this call out of the broadcast.
pub type BeforeBroadcast = Box<dyn Fn(B256) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Where settlements may share a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub multicall: Address,
    pub settings: BatchSettings,
}

/// A contract call waiting for its transaction.
struct Call {
    to: Address,
    input: Bytes,
    /// When sent alone: a batch has its own.
    gas_limit: u64,
    before: Option<BeforeBroadcast>,
    batching: Option<Batching>,
    queued_at: Instant,
    reply: oneshot::Sender<Result<Sent, SendError>>,
}

enum Message {
    Send(Call),
    /// Forget the cached nonce: a transaction was lost, so the chain must be asked again.
    Resync,
}

#[derive(Clone)]
pub struct TxQueue {
    messages: mpsc::Sender<Message>,
}

impl TxQueue {
    pub fn spawn(provider: RootProvider, signer: PrivateKeySigner, chain_id: u64) -> TxQueue {
        let (messages, inbox) = mpsc::channel(4096);
        let (in_flight, in_flight_count) = watch::channel(0);
        let worker = Worker {
            provider,
            signer,
            chain_id,
            next_nonce: None,
            fees: None,
            in_flight: Arc::new(in_flight),
            in_flight_count,
        };
        tokio::spawn(worker.run(inbox));
        TxQueue { messages }
    }

    /// Signs and broadcasts a call, alone or (with `batching`) in a batch; returns the transaction that carries
    /// it once the node has accepted it. `before` runs inside the queue, between signing and
    /// broadcasting, so a caller that goes away cannot split the two.
    pub async fn send(
        &self,
        to: Address,
        input: Bytes,
        batching: Option<Batching>,
        before: Option<BeforeBroadcast>,
    ) -> Result<Sent, SendError> {
        self.enqueue(to, input, chain::SETTLE_GAS_LIMIT, batching, before).await
    }

    /// Signs and broadcasts a call that is never batched, with `gas_limit` gas; as [`TxQueue::send`] otherwise.
    pub async fn send_alone(
        &self,
        to: Address,
        input: Bytes,
        gas_limit: u64,
        before: Option<BeforeBroadcast>,
    ) -> Result<Sent, SendError> {
        self.enqueue(to, input, gas_limit, None, before).await
    }

    async fn enqueue(
        &self,
        to: Address,
        input: Bytes,
        gas_limit: u64,
        batching: Option<Batching>,
        before: Option<BeforeBroadcast>,
    ) -> Result<Sent, SendError> {
        let (reply, answer) = oneshot::channel();
        let call = Call { to, input, gas_limit, before, batching, queued_at: Instant::now(), reply };
        self.messages
            .send(Message::Send(call))
            .await
            .map_err(|_| SendError::Refused("the settlement queue has stopped".into()))?;
        answer.await.map_err(|_| SendError::Refused("the settlement queue has stopped".into()))?
    }

    pub fn resync(&self) {
        let _ = self.messages.try_send(Message::Resync);
    }

    /// Whether both handles feed the same queue (one key must never have two).
    #[cfg(test)]
    pub fn same_queue(&self, other: &TxQueue) -> bool {
        self.messages.same_channel(&other.messages)
    }
}

struct Worker {
    provider: RootProvider,
    signer: PrivateKeySigner,
    chain_id: u64,
    next_nonce: Option<u64>,
    fees: Option<(Instant, (u128, u128))>,
    /// How many of the key's transactions are in flight: accepted by the node, their receipt not yet seen.
    in_flight: Arc<watch::Sender<usize>>,
    in_flight_count: watch::Receiver<usize>,
}

impl Worker {
    async fn run(mut self, mut inbox: mpsc::Receiver<Message>) {
        // Lone calls that arrived while a batch was filling, in order.
        let mut deferred = VecDeque::new();
        loop {
            let call = match deferred.pop_front() {
                Some(call) => call,
                None => match inbox.recv().await {
                    Some(Message::Send(call)) => call,
                    Some(Message::Resync) => {
                        self.next_nonce = None;
                        continue;
                    }
                    None => return,
                },
            };
            let batch = match call.batching {
                Some(batching) if *self.in_flight_count.borrow() > 0 => {
                    self.fill(call, batching, &mut inbox, &mut deferred).await
                }
                // Nothing in flight: waiting for company would only delay this payment.
                _ => vec![call],
            };
            self.broadcast(batch).await;
        }
    }

    /// Gathers the calls that share `first`'s batch, while a transaction is in flight: until none is any more,
    /// the batch is full, or the window closes. The window opens when `first` was queued, not when the worker
    /// got to it, so no payment waits longer than the window for its batch, even behind a slow broadcast.
    ///
    /// The batch goes when the last transaction in flight lands, not the first: on a chain that mines at once
    /// there is rarely more than one, and on one that takes blocks the window decides anyway, so waiting for
    /// the last only keeps batches large (fewer transactions, fewer nonces, less gas per payment) where a
    /// flush at each receipt would cut them short. Calls already queued join before the batch closes, free.
    async fn fill(
        &mut self,
        first: Call,
        batching: Batching,
        inbox: &mut mpsc::Receiver<Message>,
        deferred: &mut VecDeque<Call>,
    ) -> Vec<Call> {
        let closes = tokio::time::Instant::from_std(first.queued_at + batching.settings.window);
        let mut batch = vec![first];
        while batch.len() < batching.settings.max {
            let message = tokio::select! {
                biased;
                message = inbox.recv() => message,
                () = all_landed(&mut self.in_flight_count) => break,
                () = tokio::time::sleep_until(closes) => break,
            };
            match message {
                Some(Message::Send(call)) if call.batching.map(|b| b.multicall) == Some(batching.multicall) => {
                    batch.push(call)
                }
                Some(Message::Send(call)) => deferred.push_back(call),
                Some(Message::Resync) => self.next_nonce = None,
                None => break,
            }
        }
        batch
    }

    /// Sends one transaction for all of `calls` (directly for a single call, through `aggregate3` for more) and
    /// tells each caller its hash, or why it was not sent.
    async fn broadcast(&mut self, mut calls: Vec<Call>) {
        let mut last_refusal = String::new();
        for _ in 0..SEND_ATTEMPTS {
            let signed = match self.sign_recorded(&mut calls).await {
                Ok(Some(signed)) => signed,
                Ok(None) => return,
                Err(refusal) => return answer(calls, Err(SendError::Refused(refusal))),
            };
            match self.provider.send_raw_transaction(&signed.raw).await {
                Ok(_) => {
                    self.next_nonce = Some(signed.nonce + 1);
                    let in_flight = InFlight::start(&self.in_flight);
                    return answer(calls, Ok(Sent { hash: signed.hash, in_flight }));
                }
                Err(err) if err.as_error_resp().is_some() => {
                    // Most refusals are a stale nonce (another sender, a dropped transaction): ask the chain again.
                    last_refusal = err.to_string();
                    self.next_nonce = None;
                }
                Err(_) => {
                    self.next_nonce = None;
                    return answer(calls, Err(SendError::Unknown(signed.hash)));
                }
            }
        }
        answer(calls, Err(SendError::Refused(last_refusal)))
    }

    /// Signs a transaction for `calls` and records its hash for each of them. A call whose record fails is
    /// answered and left out, and the rest signed again. `Ok(None)`: no call is left.
    async fn sign_recorded(&mut self, calls: &mut Vec<Call>) -> Result<Option<Signed>, String> {
        loop {
            let Some(signed) = self.sign(calls).await? else { return Ok(None) };
            // All of a batch's records at once: one after another, they would hold up every settlement behind.
            let mut recording = tokio::task::JoinSet::new();
            for (position, record) in
                calls.iter().enumerate().filter_map(|(i, c)| Some((i, c.before.as_ref()?(signed.hash))))
            {
                recording.spawn(async move { (position, record.await) });
            }
            let mut refusals = Vec::new();
            while let Some(done) = recording.join_next().await {
                match done {
                    Ok((_, Ok(()))) => {}
                    Ok((position, Err(refusal))) => refusals.push((position, refusal)),
                    Err(_) => return Err("recording the settlement transaction failed".into()),
                }
            }
            if refusals.is_empty() {
                return Ok(Some(signed));
            }
            // Leave out the calls whose record failed (last first, so positions stay valid), and sign again.
            refusals.sort_by_key(|(position, _)| std::cmp::Reverse(*position));
            for (position, refusal) in refusals {
                let _ = calls.remove(position).reply.send(Err(SendError::Refused(refusal)));
            }
        }
    }

    async fn sign(&mut self, calls: &[Call]) -> Result<Option<Signed>, String> {
        let (to, input, gas_limit) = match calls {
            [] => return Ok(None),
            [call] => (call.to, call.input.clone(), call.gas_limit),
            [first, ..] => {
                // Only `fill` makes batches, of calls that all name this contract.
                let multicall = first.batching.ok_or("a batch without a multicall contract")?.multicall;
                let (input, gas_limit) = chain::batch_calldata(calls.iter().map(|c| (c.to, c.input.clone())));
                (multicall, input, gas_limit)
            }
        };
        let params = self.params().await.map_err(|e| format!("cannot prepare the transaction: {e}"))?;
        let raw =
            chain::sign_call(&self.signer, to, input, gas_limit, &params).map_err(|e| format!("cannot sign: {e}"))?;
        Ok(Some(Signed { hash: keccak256(&raw), raw, nonce: params.nonce }))
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

struct Signed {
    raw: Vec<u8>,
    hash: B256,
    nonce: u64,
}

/// Returns once none of the queue's transactions is in flight.
async fn all_landed(in_flight_count: &mut watch::Receiver<usize>) {
    // The sender lives as long as the worker: an error cannot happen, and would mean nothing is in flight.
    let _ = in_flight_count.wait_for(|count| *count == 0).await;
}

fn answer(calls: Vec<Call>, outcome: Result<Sent, SendError>) {
    for call in calls {
        let _ = call.reply.send(outcome.clone());
    }
}
