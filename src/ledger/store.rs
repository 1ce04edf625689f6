//! SQLite storage of the ledger: its schema, rows and state transitions. Every call goes through the writer
//! (`writer.rs`), which commits concurrent calls together.

use super::writer::Writer;
use super::{State, Step};
use crate::text;
use alloy::primitives::{Address, B256, U256};
use rusqlite::{params, Connection};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("ledger: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("ledger: the writer has stopped")]
    Shutdown,
    #[error("ledger: the transaction did not commit: {0}")]
    Commit(String),
    #[error("ledger: payment {0} is no longer in the state this step expects")]
    Conflict(i64),
}

#[derive(Clone)]
pub struct Ledger {
    writer: Writer,
}

/// What is known of a payment when it is first recorded (at verification).
#[derive(Debug, Clone)]
pub struct NewPayment {
    pub route: String,
    pub payer: Address,
    pub payee: Address,
    pub network: String,
    pub chain_id: u64,
    pub asset: Address,
    /// Atomic units of the asset.
    pub amount: U256,
    pub nonce: B256,
    pub valid_before: u64,
    pub settle_mode: &'static str,
    /// `local`, or the URL of the remote facilitator that settles it.
    pub facilitator: String,
    /// `exact` (`amount` is charged) or `upto` (`amount` is the ceiling; the charge is metered).
    pub scheme: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    pub id: i64,
    pub state: State,
    pub route: String,
    pub payer: Address,
    pub payee: Address,
    pub network: String,
    pub chain_id: u64,
    pub asset: Address,
    /// Atomic units of the asset.
    #[serde(serialize_with = "decimal")]
    pub amount: U256,
    pub nonce: B256,
    pub valid_before: u64,
    pub settle_mode: String,
    pub facilitator: String,
    pub transaction: Option<String>,
    pub upstream_status: Option<u16>,
    pub served: bool,
    pub failure: Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
    pub scheme: String,
    /// What the buyer was charged, atomic units: `amount` for `exact`; metered, at most `amount`, for `upto`
    /// (`None` until metered).
    #[serde(serialize_with = "optional_decimal")]
    pub charged: Option<U256>,
    /// The answer's token usage, as read from it (`upto` routes).
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// What settles an answer that goes out before its payment (an `upto` stream) if the gateway stops before
    /// it has: written when the stream starts. It holds the buyer's signed payload, so listings leave it out.
    #[serde(skip)]
    pub settle_ticket: Option<StoredTicket>,
}

/// A row's settle ticket as stored. It holds the buyer's signed payment, so `Debug` shows its length only.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredTicket(pub String);

impl std::fmt::Debug for StoredTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoredTicket({} bytes)", self.0.len())
    }
}

impl Row {
    /// What the buyer paid or pays once settled.
    pub fn charge(&self) -> U256 {
        self.charged.unwrap_or(self.amount)
    }
}

/// Amounts in `ledger show` and the like as the ledger stores them and `ledger list` prints them: decimal atomic
/// units (serde's default for `U256` is hex).
fn decimal<S: serde::Serializer>(amount: &U256, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(amount)
}

fn optional_decimal<S: serde::Serializer>(amount: &Option<U256>, serializer: S) -> Result<S::Ok, S::Error> {
    match amount {
        Some(amount) => serializer.collect_str(amount),
        None => serializer.serialize_none(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Revenue {
    pub route: String,
    pub day: String,
    pub network: String,
    pub asset: String,
    pub payments: u64,
    /// Atomic units, summed exactly.
    pub amount: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS payments (
    id              INTEGER PRIMARY KEY,
    state           TEXT NOT NULL,
    route           TEXT NOT NULL,
    payer           TEXT NOT NULL,
    payee           TEXT NOT NULL,
    network         TEXT NOT NULL,
    chain_id        INTEGER NOT NULL,
    asset           TEXT NOT NULL,
    amount          TEXT NOT NULL,
    nonce           TEXT NOT NULL,
    valid_before    INTEGER NOT NULL,
    settle_mode     TEXT NOT NULL,
    facilitator     TEXT NOT NULL,
    tx_hash         TEXT,
    upstream_status INTEGER,
    served          INTEGER NOT NULL DEFAULT 0,
    failure         TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    UNIQUE (chain_id, asset, payer, nonce)
);
CREATE INDEX IF NOT EXISTS payments_state ON payments (state);
";

/// Columns added since the first schema, with their definitions: a ledger written by an older version gains
/// them when opened.
const ADDED_COLUMNS: [(&str, &str); 5] = [
    ("scheme", "TEXT NOT NULL DEFAULT 'exact'"),
    ("charged", "TEXT"),
    ("prompt_tokens", "INTEGER"),
    ("completion_tokens", "INTEGER"),
    ("settle_ticket", "TEXT"),
];

fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    let existing: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('payments')")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for (name, definition) in ADDED_COLUMNS {
        if !existing.iter().any(|c| c == name) {
            conn.execute_batch(&format!("ALTER TABLE payments ADD COLUMN {name} {definition}"))?;
        }
    }
    Ok(())
}

const COLUMNS: &str = "id, state, route, payer, payee, network, chain_id, asset, amount, nonce, valid_before, \
                       settle_mode, facilitator, tx_hash, upstream_status, served, failure, created_at, updated_at, \
                       scheme, charged, prompt_tokens, completion_tokens, settle_ticket";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        id: r.get(0)?,
        state: {
            let name: String = r.get(1)?;
            State::parse(&name).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    1,
                    rusqlite::types::Type::Text,
                    format!("unknown state `{name}`").into(),
                )
            })?
        },
        route: r.get(2)?,
        payer: parsed(r, 3)?,
        payee: parsed(r, 4)?,
        network: r.get(5)?,
        chain_id: r.get(6)?,
        asset: parsed(r, 7)?,
        amount: parsed(r, 8)?,
        nonce: parsed(r, 9)?,
        valid_before: r.get(10)?,
        settle_mode: r.get(11)?,
        facilitator: r.get(12)?,
        transaction: r.get(13)?,
        upstream_status: r.get(14)?,
        served: r.get(15)?,
        failure: r.get(16)?,
        created_at: r.get(17)?,
        updated_at: r.get(18)?,
        scheme: r.get(19)?,
        charged: r
            .get::<_, Option<String>>(20)?
            .map(|text| text.parse())
            .transpose()
            .map_err(|err| rusqlite::Error::FromSqlConversionFailure(20, rusqlite::types::Type::Text, Box::new(err)))?,
        prompt_tokens: r.get(21)?,
        completion_tokens: r.get(22)?,
        settle_ticket: r.get::<_, Option<String>>(23)?.map(StoredTicket),
    })
}

/// A column stored as the text of a typed value (an address, an amount, a nonce), parsed back.
fn parsed<T: std::str::FromStr>(r: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<T>
where
    T::Err: std::fmt::Display,
{
    let text: String = r.get(column)?;
    text.parse().map_err(|err: T::Err| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, err.to_string().into())
    })
}

fn now() -> u64 {
    crate::replay::unix_now()
}

impl Ledger {
    /// Opens (creating it and its folder if needed) the ledger at `path`.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        let fail = |message: String| LedgerError::Open { path: path.to_path_buf(), message };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        let conn = Connection::open(path).map_err(|e| fail(e.to_string()))?;
        // WAL with synchronous=NORMAL: a committed state survives the process being killed (not a power cut).
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;")
            .and_then(|_| conn.execute_batch(SCHEMA))
            .and_then(|_| add_missing_columns(&conn))
            .map_err(|e| fail(e.to_string()))?;
        // Room for every statement the ledger runs: each is prepared once.
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Ledger { writer: Writer::start(conn).map_err(|e| fail(e.to_string()))? })
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, LedgerError> {
        self.writer.run(job).await
    }

    /// Records a verified payment and returns its row id. An authorization seen before, never charged
    /// (`released` or `failed`: reconciliation marks `failed` only what the chain says did not move) and never
    /// served gets its row back in `verified`; any other is returned as it is, to refuse or replay.
    pub async fn record_verified(&self, p: NewPayment) -> Result<Result<i64, Row>, LedgerError> {
        self.run(move |conn| {
            let existing = by_authorization(conn, p.chain_id, p.asset, p.payer, p.nonce)?;
            let t = now();
            match existing {
                // An answer that went out (a stream whose settlement then failed) spends its authorization
                // for good: paid again, it would be served twice for one payment at most.
                Some(old) if Step::Reverified.allowed_from().contains(&old.state) && !old.served => {
                    conn.prepare_cached(
                        "UPDATE payments SET state = 'verified', route = ?2, facilitator = ?3, failure = NULL, tx_hash = NULL, \
                         upstream_status = NULL, amount = ?5, charged = NULL, prompt_tokens = NULL, \
                         completion_tokens = NULL, settle_ticket = NULL, updated_at = ?4 WHERE id = ?1",
                    )?
                    .execute(params![old.id, p.route, p.facilitator, t, p.amount.to_string()])?;
                    Ok(Ok(old.id))
                }
                Some(old) => Ok(Err(old)),
                None => {
                    conn.prepare_cached(
                        "INSERT INTO payments (state, route, payer, payee, network, chain_id, asset, amount, nonce, valid_before, settle_mode, facilitator, created_at, updated_at, scheme)
                         VALUES ('verified', ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13)",
                    )?
                    .execute(params![p.route, p.payer.to_string(), p.payee.to_string(), p.network, p.chain_id, p.asset.to_string(), p.amount.to_string(), p.nonce.to_string(), p.valid_before, p.settle_mode, p.facilitator, t, p.scheme])?;
                    Ok(Ok(conn.last_insert_rowid()))
                }
            }
        })
        .await
    }

    /// About to settle (before anything is broadcast).
    pub async fn settling(&self, id: i64, upstream_status: Option<u16>) -> Result<(), LedgerError> {
        let set = "upstream_status = COALESCE(?2, upstream_status)";
        self.update(id, Step::Settling, set, upstream_status.map(i64::from)).await
    }

    /// The metered charge of an `upto` payment and the usage it was priced from, before settling it.
    pub async fn metered(&self, id: i64, charged: U256, usage: Option<(u64, u64)>) -> Result<(), LedgerError> {
        let t = now();
        let sql = format!(
            "UPDATE payments SET charged = ?2, prompt_tokens = ?3, completion_tokens = ?4, updated_at = ?5 \
             WHERE id = ?1 AND {}",
            Step::Metered.guard_sql()
        );
        let (prompt, completion) = (usage.map(|u| u.0), usage.map(|u| u.1));
        let changed = self
            .run(move |conn| {
                conn.prepare_cached(&sql)?.execute(params![id, charged.to_string(), prompt, completion, t])
            })
            .await?;
        if changed == 0 {
            return Err(LedgerError::Conflict(id));
        }
        Ok(())
    }

    /// An answer going out before its payment settles, `charged` so far: `ticket` settles it if the gateway
    /// stops first.
    pub async fn streaming(&self, id: i64, ticket: String, charged: U256) -> Result<(), LedgerError> {
        let t = now();
        let sql = format!(
            "UPDATE payments SET settle_ticket = ?2, charged = ?3, updated_at = ?4 WHERE id = ?1 AND {}",
            Step::Streaming.guard_sql()
        );
        let changed = self
            .run(move |conn| conn.prepare_cached(&sql)?.execute(params![id, ticket, charged.to_string(), t]))
            .await?;
        if changed == 0 {
            return Err(LedgerError::Conflict(id));
        }
        Ok(())
    }

    /// A settlement transaction's hash, written before it is broadcast: the row stays `settling`.
    pub async fn pending(&self, id: i64, transaction: String) -> Result<(), LedgerError> {
        self.update(id, Step::Pending, "tx_hash = ?2", Some(transaction)).await
    }

    pub async fn settled(&self, id: i64, transaction: String) -> Result<(), LedgerError> {
        // Its ticket is spent: the signed payment it holds is kept no longer than needed.
        self.update(id, Step::Settled, "tx_hash = ?2, failure = NULL, settle_ticket = NULL", Some(transaction)).await
    }

    /// Certainly no money moved (refused, reverted, never sent, expired).
    pub async fn failed(&self, id: i64, reason: String, transaction: Option<String>) -> Result<(), LedgerError> {
        let t = now();
        let sql = format!(
            "UPDATE payments SET state = 'failed', failure = ?2, tx_hash = COALESCE(?3, tx_hash), \
             settle_ticket = NULL, updated_at = ?4 WHERE id = ?1 AND {}",
            Step::Failed.guard_sql()
        );
        let changed =
            self.run(move |conn| conn.prepare_cached(&sql)?.execute(params![id, reason, transaction, t])).await?;
        if changed == 0 {
            return Err(LedgerError::Conflict(id));
        }
        Ok(())
    }

    /// The answer failed before any settlement: nothing charged.
    pub async fn released(&self, id: i64, upstream_status: Option<u16>) -> Result<(), LedgerError> {
        let set = "upstream_status = ?2, settle_ticket = NULL";
        self.update(id, Step::Released, set, upstream_status.map(i64::from)).await
    }

    pub async fn refund_needed(&self, id: i64, reason: String) -> Result<(), LedgerError> {
        self.update(id, Step::RefundNeeded, "failure = ?2", Some(reason)).await
    }

    /// The paid answer was handed over whole (possibly to a retry, while its settlement is being recorded). A
    /// payment marked for refund only because it had not been is settled after all.
    pub async fn served(&self, id: i64) -> Result<(), LedgerError> {
        let set =
            "served = 1, state = CASE WHEN state = 'refund_needed' AND failure = ?2 THEN 'settled' ELSE state END, \
                   failure = CASE WHEN failure = ?2 THEN NULL ELSE failure END";
        self.update(id, Step::Served, set, Some(super::reconcile::NEVER_SERVED.to_string())).await
    }

    /// One step, which also sets the columns in `set`, allowed only from the states the transition table
    /// gives it: a row that moved underneath (reconciled meanwhile, say) is a conflict, never overwritten.
    async fn update<P: rusqlite::ToSql + Send + 'static>(
        &self,
        id: i64,
        step: Step,
        set: &'static str,
        value: Option<P>,
    ) -> Result<(), LedgerError> {
        let t = now();
        let state = step.to().map(|to| format!("state = '{}', ", to.as_str())).unwrap_or_default();
        let sql = format!("UPDATE payments SET {state}{set}, updated_at = ?3 WHERE id = ?1 AND {}", step.guard_sql());
        let changed = self.run(move |conn| conn.prepare_cached(&sql)?.execute(params![id, value, t])).await?;
        if changed == 0 {
            return Err(LedgerError::Conflict(id));
        }
        Ok(())
    }

    pub async fn find(
        &self,
        chain_id: u64,
        asset: Address,
        payer: Address,
        nonce: B256,
    ) -> Result<Option<Row>, LedgerError> {
        self.run(move |conn| by_authorization(conn, chain_id, asset, payer, nonce)).await
    }

    pub async fn get(&self, id: i64) -> Result<Option<Row>, LedgerError> {
        self.run(move |conn| Ok(rows_where(conn, "id = ?1", params![id])?.pop())).await
    }

    /// Rows filtered by state, route and payer (each optional), newest first.
    pub async fn list(
        &self,
        state: Option<State>,
        route: Option<String>,
        payer: Option<String>,
        limit: u32,
    ) -> Result<Vec<Row>, LedgerError> {
        self.run(move |conn| {
            let condition = "(?1 IS NULL OR state = ?1) AND (?2 IS NULL OR route = ?2) \
                             AND (?3 IS NULL OR lower(payer) = lower(?3)) ORDER BY id DESC LIMIT ?4";
            rows_where(conn, condition, params![state.map(State::as_str), route, payer, limit])
        })
        .await
    }

    pub async fn in_state(&self, state: State) -> Result<Vec<Row>, LedgerError> {
        self.list(Some(state), None, None, u32::MAX).await
    }

    /// `failed` rows whose authorization is, or was until `since`, still valid: someone may yet land it.
    pub async fn failed_valid_since(&self, since: u64) -> Result<Vec<Row>, LedgerError> {
        self.run(move |conn| rows_where(conn, "state = 'failed' AND valid_before > ?1", params![since])).await
    }

    /// A payment recorded as failed moved after all (its authorization, public once broadcast, was landed by
    /// someone else): the buyer had no answer, so it is owed a refund.
    pub async fn landed_late(&self, id: i64, transaction: String) -> Result<(), LedgerError> {
        let set = "tx_hash = ?2, failure = 'settled after it was reported failed; the answer was withheld'";
        self.update(id, Step::LandedLate, set, Some(transaction)).await
    }

    /// A row recorded failed, whose answer had gone out before it settled (a stream), settled after all.
    pub async fn settled_late(&self, id: i64, transaction: String) -> Result<(), LedgerError> {
        self.update(id, Step::SettledLate, "tx_hash = ?2, failure = NULL, settle_ticket = NULL", Some(transaction))
            .await
    }

    /// Authorizations that must stay refused after a restart: charged, or possibly being charged, and not expired.
    pub async fn unexpired_spent(&self, now: u64) -> Result<Vec<Row>, LedgerError> {
        self.run(move |conn| {
            let condition = "state IN ('verified', 'settling', 'settled', 'refund_needed') AND valid_before > ?1";
            rows_where(conn, condition, params![now])
        })
        .await
    }

    /// Settled revenue by route, UTC day, network and asset. Sums are exact (atomic units as decimal strings).
    pub async fn revenue(&self) -> Result<Vec<Revenue>, LedgerError> {
        let rows = self.run(|conn| rows_where(conn, "state IN ('settled', 'refund_needed')", [])).await?;
        let mut sums: std::collections::BTreeMap<(String, String, String, String), (u64, alloy::primitives::U256)> =
            Default::default();
        for r in rows {
            // The day it was paid for: `created_at` stays put when later flags (served, refund) change.
            let day = day_of(r.created_at);
            let charge = r.charge();
            let entry = sums.entry((r.route, day, r.network, r.asset.to_string())).or_default();
            entry.0 += 1;
            entry.1 += charge;
        }
        Ok(sums
            .into_iter()
            .map(|((route, day, network, asset), (payments, amount))| Revenue {
                route,
                day,
                network,
                asset,
                payments,
                amount: amount.to_string(),
            })
            .collect())
    }
}

/// The row of one authorization, if it was ever recorded.
fn by_authorization(
    conn: &Connection,
    chain_id: u64,
    asset: Address,
    payer: Address,
    nonce: B256,
) -> rusqlite::Result<Option<Row>> {
    // At most one: the table's unique constraint. Stored as each value's text, as it is written.
    let condition = "chain_id = ?1 AND asset = ?2 AND payer = ?3 AND nonce = ?4";
    let (asset, payer, nonce) = (asset.to_string(), payer.to_string(), nonce.to_string());
    Ok(rows_where(conn, condition, params![chain_id, asset, payer, nonce])?.pop())
}

/// The rows matching `condition` (what follows `WHERE`; static, so never built from input), with its parameters.
fn rows_where(conn: &Connection, condition: &'static str, params: impl rusqlite::Params) -> rusqlite::Result<Vec<Row>> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM payments WHERE {condition}"))?.query_map(params, row)?.collect()
}

/// `YYYY-MM-DD` (UTC) of a unix time, by the civil-from-days algorithm.
fn day_of(unix: u64) -> String {
    let (year, month, day) = text::civil_from_days(unix / 86_400);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payment() -> NewPayment {
        NewPayment {
            route: "/r".into(),
            payer: Address::repeat_byte(1),
            payee: Address::repeat_byte(2),
            network: "eip155:1".into(),
            chain_id: 1,
            asset: Address::repeat_byte(3),
            amount: U256::from(1000),
            nonce: B256::repeat_byte(4),
            valid_before: u64::MAX / 2,
            settle_mode: "after",
            facilitator: "local".into(),
            scheme: "exact",
        }
    }

    #[tokio::test]
    async fn transitions_are_guarded_by_the_current_state() {
        let path = std::env::temp_dir().join(format!("x402-ledger-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let ledger = Ledger::open(&path).unwrap();
        let id = ledger.record_verified(payment()).await.unwrap().unwrap();
        assert!(
            matches!(ledger.pending(id, "0xaa".into()).await, Err(LedgerError::Conflict(_))),
            "no hash before settling"
        );
        ledger.settling(id, Some(200)).await.unwrap();
        ledger.settled(id, "0xaa".into()).await.unwrap();
        // A late failure (or release) cannot overwrite a settlement.
        assert!(matches!(ledger.failed(id, "late".into(), None).await, Err(LedgerError::Conflict(_))));
        assert!(matches!(ledger.released(id, None).await, Err(LedgerError::Conflict(_))));
        assert_eq!(ledger.get(id).await.unwrap().unwrap().state, "settled");
        // A settled authorization is not recorded again: the row comes back for a replay or a refusal.
        assert!(matches!(ledger.record_verified(payment()).await.unwrap(), Err(row) if row.id == id));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn days() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(1_764_064_000), "2025-11-25");
        assert_eq!(day_of(951_782_400), "2000-02-29");
    }
}
