//! Simulating settlements together. With batching on, the simulations that arrive while others are in flight
//! share one `eth_call` through Multicall3's `aggregate3`, each call allowed to fail alone: a burst of payments
//! costs the node a few calls instead of one each. As for settlement batches (Nagle's algorithm), a
//! simulation that finds none in flight is made at once by its caller, so a lone payment pays nothing for
//! the sharing; one that finds a free slot of the worker is simulated at once too.

use super::queue::Batching;
use crate::chain;
use alloy::primitives::{Address, Bytes};
use alloy::providers::RootProvider;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// `eth_call`s in flight at once; what arrives meanwhile goes into the next one.
const IN_FLIGHT: usize = 2;

/// Whether the call would succeed now; `Err` when the node could not say.
type Verdict = Result<bool, String>;

struct Request {
    token: Address,
    input: Bytes,
    reply: oneshot::Sender<Verdict>,
}

pub struct Simulations {
    requests: mpsc::UnboundedSender<Request>,
    provider: RootProvider,
    settler: Address,
    /// Simulations asked for and not answered yet, made by their callers or by the worker.
    pending: Arc<AtomicUsize>,
}

/// One simulation in [`Simulations::pending`], until it is answered (or its caller goes away).
struct Pending(Arc<AtomicUsize>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Simulations {
    /// Must run inside the tokio runtime. `settler` sends the calls; `multicall` carries up to `batching.max` at
    /// once, the settlement batch's own limit, so a simulation never asks for more gas than its transaction.
    pub fn spawn(provider: RootProvider, settler: Address, batching: Batching) -> Simulations {
        let (requests, inbox) = mpsc::unbounded_channel();
        tokio::spawn(run(provider.clone(), settler, batching, inbox));
        Simulations { requests, provider, settler, pending: Arc::new(AtomicUsize::new(0)) }
    }

    /// Whether `input` sent to `token` would succeed if the settler sent it now.
    pub async fn would_succeed(&self, token: Address, input: Bytes) -> Verdict {
        let alone = self.pending.fetch_add(1, Ordering::AcqRel) == 0;
        let _pending = Pending(self.pending.clone());
        if alone {
            // None in flight to share with: a trip through the worker would only add its hops.
            return chain::would_succeed(&self.provider, self.settler, token, input).await.map_err(|e| e.to_string());
        }
        let (reply, verdict) = oneshot::channel();
        let stopped = || "the simulation worker has stopped".to_string();
        self.requests.send(Request { token, input, reply }).map_err(|_| stopped())?;
        verdict.await.map_err(|_| stopped())?
    }
}

async fn run(
    provider: RootProvider,
    settler: Address,
    batching: Batching,
    mut inbox: mpsc::UnboundedReceiver<Request>,
) {
    let Batching { multicall, settings } = batching;
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut batch = Vec::new();
        if inbox.recv_many(&mut batch, settings.max).await == 0 {
            return;
        }
        let provider = provider.clone();
        tokio::spawn(async move {
            let verdicts = match batch.as_slice() {
                [alone] => {
                    chain::would_succeed(&provider, settler, alone.token, alone.input.clone()).await.map(|v| vec![v])
                }
                _ => {
                    let calls = batch.iter().map(|r| (r.token, r.input.clone())).collect();
                    chain::would_each_succeed(&provider, settler, multicall, calls).await
                }
            };
            match verdicts {
                Ok(verdicts) => {
                    for (request, verdict) in batch.into_iter().zip(verdicts) {
                        let _ = request.reply.send(Ok(verdict));
                    }
                }
                Err(err) => {
                    for request in batch {
                        let _ = request.reply.send(Err(err.to_string()));
                    }
                }
            }
            drop(slot);
        });
    }
}
