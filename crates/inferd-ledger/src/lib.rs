//! The usage ledger: one row per request, however it ended, in a SQLite
//! file in WAL mode. One writer thread owns the write connection and
//! commits whatever has queued up as one transaction (group commit), so
//! a burst of requests costs one commit, not one each. A committed row
//! survives the process being killed (WAL with `synchronous=NORMAL` loses
//! only on power failure; `Durability::Full` covers that too).
//!
//! Reads (usage summaries) use their own connection and never wait for
//! the writer.

mod query;
mod schema;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::oneshot;

pub use query::{GroupBy, Summary, SummaryRow, UsageQuery, tokens_by_tenant_since};
pub use schema::integrity_check;

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 4096;

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("ledger query: {0}")]
    Query(#[from] rusqlite::Error),
    #[error("the ledger writer has stopped")]
    Stopped,
    #[error("creating the ledger's folder {path}: {source}")]
    Folder { path: String, source: std::io::Error },
}

/// One request's usage, as written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageRecord {
    /// The `X-Request-Id` of the HTTP request.
    pub request_id: String,
    /// The `id` of the response body (`cmpl-…`, `chatcmpl-…`).
    pub response_id: String,
    pub tenant: String,
    /// The API key's id from the config (never the key).
    pub key_id: Option<String>,
    pub model: String,
    pub feature: Option<String>,
    /// `completions` or `chat`.
    pub route: String,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    /// stop, length, abort or error.
    pub finish_reason: String,
    /// How the request ended: completed, client_disconnect, timeout,
    /// queue_timeout, shutdown or error.
    pub outcome: String,
    pub queue_seconds: Option<f64>,
    pub ttft_seconds: Option<f64>,
    pub total_seconds: f64,
    /// When it ended, Unix milliseconds.
    pub ts_ms: i64,
    pub cost_usd: Option<f64>,
    /// Only for tenants that opted in, already redacted.
    pub prompt_text: Option<String>,
    pub completion_text: Option<String>,
}

/// A thumbs up or down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rating {
    Up,
    Down,
}

impl Rating {
    pub fn as_str(self) -> &'static str {
        match self {
            Rating::Up => "up",
            Rating::Down => "down",
        }
    }
}

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Survives a crash of the process (`synchronous=NORMAL`).
    #[default]
    Process,
    /// Survives power loss too (`synchronous=FULL`): an fsync per commit.
    Full,
}

/// Counters of the writer, mirrored into metrics at scrape time.
#[derive(Debug, Default)]
pub struct LedgerStats {
    pub records_written: AtomicU64,
    pub commits: AtomicU64,
    pub commit_micros: AtomicU64,
    pub errors: AtomicU64,
    /// Operations sent to the writer and not yet committed.
    pub pending: AtomicU64,
    /// Set while the last commit failed (the writer keeps retrying).
    pub failing: AtomicBool,
}

enum Op {
    Record(Box<UsageRecord>, Option<oneshot::Sender<()>>),
    /// Deletes records that ended before `before_ms`; replies with how many.
    Prune {
        before_ms: i64,
        reply: oneshot::Sender<u64>,
    },
    Feedback {
        tenant: String,
        request_id: String,
        rating: Rating,
        comment: Option<String>,
        ts_ms: i64,
        /// The model of the rated request, or `None` when this tenant made
        /// no request with that id.
        reply: oneshot::Sender<Option<String>>,
    },
}

/// The ledger: a handle to the writer thread and a read connection.
#[derive(Debug)]
pub struct Ledger {
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    reader: Mutex<Connection>,
    stats: Arc<LedgerStats>,
    path: PathBuf,
}

fn open(path: &Path, flags: OpenFlags) -> Result<Connection, LedgerError> {
    let err = |source| LedgerError::Open { path: path.display().to_string(), source };
    let conn = Connection::open_with_flags(path, flags).map_err(err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
    Ok(conn)
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `path` and starts its writer.
    pub fn open(path: &Path, durability: Durability) -> Result<Self, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|source| LedgerError::Folder { path: dir.display().to_string(), source })?;
        }
        let write = open(path, OpenFlags::default())?;
        schema::prepare(&write, durability)
            .map_err(|source| LedgerError::Open { path: path.display().to_string(), source })?;
        let reader = open(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(LedgerStats::default());
        let writer_stats = stats.clone();
        let writer = std::thread::Builder::new()
            .name("inferd-ledger".into())
            .spawn(move || write_loop(write, rx, &writer_stats))
            .map_err(|source| LedgerError::Folder { path: path.display().to_string(), source })?;
        Ok(Ledger {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            reader: Mutex::new(reader),
            stats,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> &LedgerStats {
        &self.stats
    }

    fn send(&self, op: Op) -> Result<(), LedgerError> {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let tx = guard.as_ref().ok_or(LedgerError::Stopped)?;
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        tx.send(op).map_err(|_| {
            self.stats.pending.fetch_sub(1, Ordering::Relaxed);
            LedgerError::Stopped
        })
    }

    /// Queues a record; the receiver fires once it is committed.
    pub fn write(&self, record: UsageRecord) -> Result<oneshot::Receiver<()>, LedgerError> {
        let (done, rx) = oneshot::channel();
        self.send(Op::Record(Box::new(record), Some(done)))?;
        Ok(rx)
    }

    /// Queues a record without waiting for it.
    pub fn write_detached(&self, record: UsageRecord) -> Result<(), LedgerError> {
        self.send(Op::Record(Box::new(record), None))
    }

    /// Rates the request `request_id` (its X-Request-Id or its response id)
    /// made by `tenant`; the last rating wins. Resolves to the request's
    /// model, or `None` when the tenant made no such request.
    pub fn feedback(
        &self,
        tenant: &str,
        request_id: &str,
        rating: Rating,
        comment: Option<String>,
        ts_ms: i64,
    ) -> Result<oneshot::Receiver<Option<String>>, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Feedback {
            tenant: tenant.to_string(),
            request_id: request_id.to_string(),
            rating,
            comment,
            ts_ms,
            reply,
        })?;
        Ok(rx)
    }

    /// Deletes records that ended before `before_ms` (retention). Resolves
    /// to the number deleted.
    pub fn prune(&self, before_ms: i64) -> Result<oneshot::Receiver<u64>, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Prune { before_ms, reply })?;
        Ok(rx)
    }

    /// Runs `f` on the read connection (blocking; call from a blocking thread).
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, LedgerError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&conn)?)
    }

    /// Stops taking records, commits what is queued and waits for the writer.
    pub fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer: waits for one operation, takes everything else already
/// queued, commits it all in one transaction, then answers the waiters.
fn write_loop(mut conn: Connection, rx: mpsc::Receiver<Op>, stats: &LedgerStats) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let mut attempt = 0u32;
        let answers = loop {
            match commit(&mut conn, &batch) {
                Ok(answers) => break answers,
                Err(e) => {
                    // Keep the batch and try again: a full disk or a locked
                    // file must not lose records.
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    stats.failing.store(true, Ordering::Relaxed);
                    attempt += 1;
                    tracing::error!(error = %e, attempt, records = batch.len(), "ledger commit failed; retrying");
                    std::thread::sleep(Duration::from_millis(200 * u64::from(attempt.min(25))));
                }
            }
        };
        let r = Ordering::Relaxed;
        stats.failing.store(false, r);
        stats.commits.fetch_add(1, r);
        stats.commit_micros.fetch_add(started.elapsed().as_micros() as u64, r);
        stats.pending.fetch_sub(batch.len() as u64, r);
        for (op, answer) in batch.into_iter().zip(answers) {
            match op {
                Op::Prune { reply, .. } => {
                    let _ = reply.send(answer.deleted);
                }
                Op::Record(_, done) => {
                    stats.records_written.fetch_add(1, r);
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
                Op::Feedback { reply, .. } => {
                    let _ = reply.send(answer.model);
                }
            }
        }
    }
}

const INSERT: &str = "INSERT INTO usage (request_id, response_id, tenant, key_id, model, feature, route, \
    prompt_tokens, cached_prompt_tokens, completion_tokens, finish_reason, outcome, queue_seconds, \
    ttft_seconds, total_seconds, ts_ms, cost_usd, prompt_text, completion_text) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)";

const RATE: &str = "UPDATE usage SET rating = ?1, feedback_comment = ?2, feedback_ts_ms = ?3 \
    WHERE tenant = ?4 AND (request_id = ?5 OR response_id = ?5) RETURNING model";

/// What one committed operation answers its sender.
#[derive(Debug, Default)]
struct Answer {
    /// The model a feedback rated, if the tenant made that request.
    model: Option<String>,
    /// Rows a prune deleted.
    deleted: u64,
}

/// Commits one batch; an answer per operation.
fn commit(conn: &mut Connection, batch: &[Op]) -> rusqlite::Result<Vec<Answer>> {
    let tx = conn.transaction()?;
    let mut out = Vec::with_capacity(batch.len());
    {
        let mut insert = tx.prepare_cached(INSERT)?;
        let mut rate = tx.prepare_cached(RATE)?;
        for op in batch {
            match op {
                Op::Record(r, _) => {
                    insert.execute(params![
                        r.request_id,
                        r.response_id,
                        r.tenant,
                        r.key_id,
                        r.model,
                        r.feature,
                        r.route,
                        r.prompt_tokens as i64,
                        r.cached_prompt_tokens as i64,
                        r.completion_tokens as i64,
                        r.finish_reason,
                        r.outcome,
                        r.queue_seconds,
                        r.ttft_seconds,
                        r.total_seconds,
                        r.ts_ms,
                        r.cost_usd,
                        r.prompt_text,
                        r.completion_text,
                    ])?;
                    out.push(Answer::default());
                }
                Op::Prune { before_ms, .. } => {
                    let deleted = tx.execute("DELETE FROM usage WHERE ts_ms < ?1", [before_ms])? as u64;
                    out.push(Answer { deleted, ..Default::default() });
                }
                Op::Feedback { tenant, request_id, rating, comment, ts_ms, .. } => {
                    let models: Vec<String> = rate
                        .query_map(params![rating.as_str(), comment, ts_ms, tenant, request_id], |row| {
                            row.get(0)
                        })?
                        .collect::<Result<_, _>>()?;
                    out.push(Answer { model: models.into_iter().next(), ..Default::default() });
                }
            }
        }
    }
    tx.commit()?;
    Ok(out)
}

#[cfg(test)]
mod tests;
