//! The ledger's one connection, on a thread of its own, with group commit: the calls queued while a
//! transaction runs share the next one, each inside its own savepoint so that a call's error undoes only its own
//! changes. No caller hears back before its transaction has committed, so write-ahead still holds. A call that
//! arrives during a commit waits for it, then shares the next one with every other call that arrived meanwhile;
//! none hops to a blocking pool.

use super::store::LedgerError;
use rusqlite::Connection;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use tokio::sync::oneshot;

/// Calls committed together at most.
const MOST_PER_COMMIT: usize = 256;

#[derive(Clone)]
pub struct Writer {
    calls: mpsc::Sender<Box<dyn Call>>,
}

impl Writer {
    pub fn start(conn: Connection) -> std::io::Result<Writer> {
        let (calls, queue) = mpsc::channel();
        std::thread::Builder::new().name("ledger".into()).spawn(move || commit_forever(&conn, &queue))?;
        Ok(Writer { calls })
    }

    /// Runs `job` in the next transaction; answers once it has committed.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let (reply, answer) = oneshot::channel();
        let call = Box::new(Queued { job: Some(job), outcome: None, reply });
        self.calls.send(call).map_err(|_| LedgerError::Shutdown)?;
        answer.await.map_err(|_| LedgerError::Shutdown)?
    }
}

fn commit_forever(conn: &Connection, queue: &mpsc::Receiver<Box<dyn Call>>) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        group.extend(queue.try_iter().take(MOST_PER_COMMIT - 1));
        let committed = commit_group(conn, &mut group);
        for call in group {
            call.answer(committed.as_ref().map(|_| ()).map_err(String::as_str));
        }
    }
}

/// Runs a group in one transaction. `Err`: nothing of the group is stored.
fn commit_group(conn: &Connection, group: &mut [Box<dyn Call>]) -> Result<(), String> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(|err| err.to_string())?;
    for call in group.iter_mut() {
        call.run(conn);
        // Some errors (a full disk, an I/O error) roll back the whole transaction, not just the call's
        // savepoint: what ran before is gone, and what follows must not run outside a transaction.
        if conn.is_autocommit() {
            return Err("the transaction was rolled back".into());
        }
    }
    conn.execute_batch("COMMIT").map_err(|err| {
        let _ = conn.execute_batch("ROLLBACK");
        err.to_string()
    })
}

/// A queued call, type-erased so that one queue carries calls of any result type.
trait Call: Send {
    fn run(&mut self, conn: &Connection);
    fn answer(self: Box<Self>, committed: Result<(), &str>);
}

struct Queued<T, F> {
    job: Option<F>,
    outcome: Option<Result<T, LedgerError>>,
    reply: oneshot::Sender<Result<T, LedgerError>>,
}

impl<T, F> Call for Queued<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> rusqlite::Result<T> + Send,
{
    fn run(&mut self, conn: &Connection) {
        if let Some(job) = self.job.take() {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| in_savepoint(conn, job)));
            self.outcome = Some(match outcome {
                Ok(outcome) => outcome.map_err(LedgerError::from),
                Err(_) => {
                    // A bug, not a state: undo the call, and keep the writer alive for every other one.
                    let _ = conn.execute_batch("ROLLBACK TO call; RELEASE call");
                    Err(LedgerError::Commit("a ledger call failed unexpectedly".into()))
                }
            });
        }
    }

    fn answer(self: Box<Self>, committed: Result<(), &str>) {
        let answer = match (committed, self.outcome) {
            (Err(why), _) => Err(LedgerError::Commit(why.to_string())),
            (Ok(()), Some(outcome)) => outcome,
            // A committed group ran every call: this is only here for the type.
            (Ok(()), None) => Err(LedgerError::Commit("the call was not run".into())),
        };
        let _ = self.reply.send(answer);
    }
}

fn in_savepoint<T>(conn: &Connection, job: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    conn.execute_batch("SAVEPOINT call")?;
    let outcome = job(conn);
    match outcome {
        Ok(_) => conn.execute_batch("RELEASE call")?,
        Err(_) => conn.execute_batch("ROLLBACK TO call; RELEASE call")?,
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_call_undoes_only_its_own_changes() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER)").unwrap();
        let writer = Writer::start(conn).unwrap();
        let fails = |n: i64| n % 10 == 3;
        let calls: Vec<_> = (0..50i64)
            .map(|n| {
                let writer = writer.clone();
                tokio::spawn(async move {
                    let call = writer.run(move |conn| {
                        conn.execute("INSERT INTO t VALUES (?1)", [n])?;
                        if fails(n) {
                            conn.execute("INSERT INTO missing VALUES (1)", [])?;
                        }
                        Ok(n)
                    });
                    call.await
                })
            })
            .collect();
        for (n, call) in (0..50).zip(calls) {
            match call.await.unwrap() {
                Ok(answered) => assert!(!fails(n) && answered == n, "call {n}"),
                Err(err) => assert!(fails(n) && matches!(err, LedgerError::Sql(_)), "call {n}: {err}"),
            }
        }
        let stored: Vec<i64> = writer
            .run(|conn| conn.prepare("SELECT n FROM t ORDER BY n")?.query_map([], |r| r.get(0))?.collect())
            .await
            .unwrap();
        assert_eq!(stored, (0..50).filter(|n| !fails(*n)).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_call_that_panics_is_undone_and_the_writer_lives_on() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER)").unwrap();
        let writer = Writer::start(conn).unwrap();
        let panicked = writer
            .run(|conn| -> rusqlite::Result<()> {
                conn.execute("INSERT INTO t VALUES (1)", [])?;
                panic!("a bug in a ledger call");
            })
            .await;
        assert!(matches!(panicked, Err(LedgerError::Commit(_))), "{panicked:?}");
        writer.run(|conn| conn.execute("INSERT INTO t VALUES (2)", [])).await.unwrap();
        let stored: Vec<i64> =
            writer.run(|conn| conn.prepare("SELECT n FROM t")?.query_map([], |r| r.get(0))?.collect()).await.unwrap();
        assert_eq!(stored, [2]);
    }
}
