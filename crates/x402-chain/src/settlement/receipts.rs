//! Waiting for settlement receipts: one poller per transaction, however many payments it carries.

use alloy::primitives::B256;
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::types::TransactionReceipt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

/// A local chain mines at once; a public one in seconds: start fast and back off.
const FIRST_POLL: Duration = Duration::from_millis(2);
const LONGEST_POLL: Duration = Duration::from_millis(500);

type Seen = watch::Receiver<Option<Arc<TransactionReceipt>>>;

pub struct Receipts {
    provider: RootProvider,
    /// Longest any payment waits; each poller gives up then.
    longest_wait: Duration,
    polling: Mutex<HashMap<B256, Seen>>,
}

impl Receipts {
    pub fn new(provider: RootProvider, longest_wait: Duration) -> Arc<Receipts> {
        Arc::new(Receipts { provider, longest_wait, polling: Mutex::new(HashMap::new()) })
    }

    /// The transaction's receipt, or `None` if `timeout` (at most the longest wait) passes first.
    pub async fn wait(self: &Arc<Self>, hash: B256, timeout: Duration) -> Option<Arc<TransactionReceipt>> {
        let mut seen = {
            let mut polling = self.polling.lock().unwrap_or_else(PoisonError::into_inner);
            polling.entry(hash).or_insert_with(|| self.clone().start_polling(hash)).clone()
        };
        let receipt = match tokio::time::timeout(timeout, seen.wait_for(Option::is_some)).await {
            Ok(Ok(receipt)) => receipt.clone(),
            _ => None,
        };
        receipt
    }

    fn start_polling(self: Arc<Self>, hash: B256) -> Seen {
        let (publish, seen) = watch::channel(None);
        tokio::spawn(async move {
            if let Some(receipt) = self.poll(hash).await {
                publish.send_replace(Some(Arc::new(receipt)));
            }
            self.polling.lock().unwrap_or_else(PoisonError::into_inner).remove(&hash);
        });
        seen
    }

    async fn poll(&self, hash: B256) -> Option<TransactionReceipt> {
        let started = tokio::time::Instant::now();
        let mut pause = FIRST_POLL;
        while started.elapsed() < self.longest_wait {
            match self.provider.get_transaction_receipt(hash).await {
                Ok(Some(receipt)) => return Some(receipt),
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(error = %err, transaction = %hash, "polling for a settlement receipt failed")
                }
            }
            tokio::time::sleep(pause.min(self.longest_wait.saturating_sub(started.elapsed()))).await;
            pause = (pause * 2).min(LONGEST_POLL);
        }
        None
    }
}
