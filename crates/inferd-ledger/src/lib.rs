//! The usage ledger: one row per request, however it ended, in a SQLite
//! file in WAL mode (one instance) or a PostgreSQL database (a fleet). One
//! writer thread owns the write connection and commits whatever has queued
//! up as one transaction (group commit), so a burst of requests costs one
//! commit, not one each. A committed row survives the process being killed
//! (SQLite: WAL with `synchronous=NORMAL` loses only on power failure;
//! `Durability::Full` covers that too. PostgreSQL: as its server is set).
//!
//! A commit that fails (a full disk, PostgreSQL down) keeps its records in
//! memory and is retried until it succeeds; [`LedgerStats::failing`] says
//! so meanwhile, and [`Ledger::backlog_full`] tells the server when to stop
//! taking new work rather than queue without bound.
//!
//! Reads (usage summaries) use their own connection and never wait for
//! the writer.

mod postgres;
mod query;
mod sqlite;
pub mod testing;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

pub use query::{GroupBy, Summary, SummaryRow, UsageQuery};
pub use sqlite::integrity_check;

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 4096;

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("ledger query: {0}")]
    Query(#[from] rusqlite::Error),
    #[error("ledger (PostgreSQL): {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("ledger {target}: {message}")]
    Connect { target: String, message: String },
    #[error("ledger (PostgreSQL): no answer within {0:?}")]
    Timeout(Duration),
    #[error("the ledger writer has stopped")]
    Stopped,
    #[error("creating the ledger's folder {path}: {source}")]
    Folder { path: String, source: std::io::Error },
    /// Its writer thread or its PostgreSQL client's runtime did not start.
    #[error("starting the ledger's writer: {0}")]
    Start(std::io::Error),
}

impl LedgerError {
    /// Whether the store could not be reached (as opposed to refusing the
    /// query): the caller may retry later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            LedgerError::Postgres(e) => e.as_db_error().is_none(),
            LedgerError::Connect { .. } | LedgerError::Timeout(_) | LedgerError::Stopped => true,
            _ => false,
        }
    }
}

/// Where the ledger lives, as `--ledger` names it: a `postgres://` or
/// `postgresql://` URL, or else a SQLite file's path. Its `Debug` and
/// `Display` leave out the URL's password.
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Target {
    pub fn parse(s: &str) -> Target {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Target::Postgres(s.to_string())
        } else {
            Target::Sqlite(PathBuf::from(s))
        }
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Target({self})")
    }
}

impl fmt::Display for Target {
    /// The path, or the URL without its password (safe to log).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Sqlite(p) => write!(f, "{}", p.display()),
            Target::Postgres(url) => f.write_str(&postgres::redact_url(url)),
        }
    }
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
    /// Records given up on: only when the ledger was closed while its store
    /// stayed unreachable past the grace period (each one logged).
    pub lost: AtomicU64,
}

/// Operations queued before new work is refused, by default (about 50 MB
/// of records without texts).
pub const DEFAULT_MAX_BACKLOG: u64 = 100_000;

/// How often [`Ledger::wait`] looks whether the store has started failing.
const FAILING_POLL: Duration = Duration::from_millis(50);

/// Why [`Ledger::wait`] returned without a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotCommitted {
    #[error("the ledger's store is failing; the operation stays queued and is retried")]
    Failing,
    #[error("not committed within {0:?}")]
    TimedOut(Duration),
    #[error("the ledger writer has stopped")]
    Stopped,
}

/// How long a closing ledger keeps retrying a store that is down.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

pub(crate) enum Op {
    Record {
        record: Box<UsageRecord>,
        /// Unique within this ledger handle: with its instance id, the key
        /// that makes a retried PostgreSQL commit insert a record once.
        seq: u64,
        done: Option<oneshot::Sender<()>>,
    },
    /// Deletes records that ended before `before_ms`; replies with how many.
    Prune { before_ms: i64, reply: oneshot::Sender<u64> },
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
    reader: Reader,
    stats: Arc<LedgerStats>,
    target: Target,
    seq: AtomicU64,
    max_backlog: AtomicU64,
    /// Once closing: how long the writer may go on retrying a failing
    /// store, in milliseconds (`u64::MAX` until then).
    closing: Arc<AtomicU64>,
    /// PostgreSQL's client runs on a runtime of the ledger's own, so the
    /// writer thread and blocking reads never need the server's.
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

#[derive(Debug)]
enum Reader {
    Sqlite(Mutex<Connection>),
    Postgres(Box<postgres::Reader>),
}

/// One store's side of the writer: commits a batch atomically.
pub(crate) trait Sink: Send + 'static {
    fn commit(&mut self, batch: &[Op]) -> Result<Vec<Answer>, LedgerError>;
}

impl Ledger {
    /// Opens the ledger `target` names: [`Ledger::open`] or
    /// [`Ledger::connect_postgres`] (which waits up to `wait` for the
    /// database). Blocking: call it off the async runtime.
    pub fn open_target(target: &Target, durability: Durability, wait: Duration) -> Result<Self, LedgerError> {
        match target {
            Target::Sqlite(path) => Self::open(path, durability),
            Target::Postgres(url) => Self::connect_postgres(url, wait),
        }
    }

    /// Opens (creating if needed) the SQLite ledger at `path` and starts
    /// its writer.
    pub fn open(path: &Path, durability: Durability) -> Result<Self, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|source| LedgerError::Folder { path: dir.display().to_string(), source })?;
        }
        let write = sqlite::open(path, OpenFlags::default())?;
        sqlite::prepare(&write, durability)
            .map_err(|source| LedgerError::Open { path: path.display().to_string(), source })?;
        let reader = sqlite::open(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        Self::start(
            sqlite::SqliteSink(write),
            Reader::Sqlite(Mutex::new(reader)),
            Target::Sqlite(path.to_path_buf()),
            None,
        )
    }

    /// Connects to the PostgreSQL ledger at `url` (retrying for up to
    /// `wait` while it cannot be reached), brings its schema up to date,
    /// and starts the writer. Blocking: call it off the async runtime.
    pub fn connect_postgres(url: &str, wait: Duration) -> Result<Self, LedgerError> {
        let target = Target::Postgres(url.to_string());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("inferd-ledger-pg")
            .enable_all()
            .build()
            .map_err(LedgerError::Start)?;
        let store = postgres::Store::new(url, runtime.handle().clone())?;
        store.migrate(wait)?;
        let (sink, reader) = (store.sink(), store.reader());
        Self::start(sink, Reader::Postgres(Box::new(reader)), target, Some(runtime))
    }

    fn start(
        sink: impl Sink,
        reader: Reader,
        target: Target,
        runtime: Option<tokio::runtime::Runtime>,
    ) -> Result<Self, LedgerError> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(LedgerStats::default());
        let closing = Arc::new(AtomicU64::new(u64::MAX));
        let (writer_stats, writer_closing) = (stats.clone(), closing.clone());
        let writer = std::thread::Builder::new()
            .name("inferd-ledger".into())
            .spawn(move || write_loop(sink, rx, &writer_stats, &writer_closing))
            .map_err(LedgerError::Start)?;
        Ok(Ledger {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            reader,
            stats,
            target,
            seq: AtomicU64::new(0),
            max_backlog: AtomicU64::new(DEFAULT_MAX_BACKLOG),
            closing,
            runtime: Mutex::new(runtime),
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
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

    /// Operations queued and not yet committed past which the server
    /// should refuse new work (see [`Ledger::backlog_full`]).
    pub fn set_max_backlog(&self, max: u64) {
        self.max_backlog.store(max.max(1), Ordering::Relaxed);
    }

    /// Whether the queue of uncommitted operations has reached its bound.
    /// Records are still accepted (a request that ran is always recorded);
    /// the server refuses new requests meanwhile instead.
    pub fn backlog_full(&self) -> bool {
        self.stats.pending.load(Ordering::Relaxed) >= self.max_backlog.load(Ordering::Relaxed)
    }

    fn record(&self, record: UsageRecord, done: Option<oneshot::Sender<()>>) -> Op {
        Op::Record { record: Box::new(record), seq: self.seq.fetch_add(1, Ordering::Relaxed), done }
    }

    /// Queues a record; the receiver fires once it is committed.
    pub fn write(&self, record: UsageRecord) -> Result<oneshot::Receiver<()>, LedgerError> {
        let (done, rx) = oneshot::channel();
        self.send(self.record(record, Some(done)))?;
        Ok(rx)
    }

    /// Queues a record without waiting for it.
    pub fn write_detached(&self, record: UsageRecord) -> Result<(), LedgerError> {
        self.send(self.record(record, None))
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

    /// Waits up to `limit` for what `rx` answers once its operation is
    /// committed, but no longer than the store works: once the ledger is
    /// failing, the operation stays queued and the caller is not held up.
    pub async fn wait<T>(&self, mut rx: oneshot::Receiver<T>, limit: Duration) -> Result<T, NotCommitted> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            if self.stats.failing.load(Ordering::Relaxed) {
                return Err(NotCommitted::Failing);
            }
            if tokio::time::Instant::now() >= until {
                return Err(NotCommitted::TimedOut(limit));
            }
            match tokio::time::timeout(FAILING_POLL, &mut rx).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(_)) => return Err(NotCommitted::Stopped),
                Err(_) => {}
            }
        }
    }

    /// Summarizes usage (blocking; call from a blocking thread).
    pub fn summary(&self, q: &UsageQuery) -> Result<Summary, LedgerError> {
        match &self.reader {
            Reader::Sqlite(conn) => Ok(sqlite::summary(&conn.lock().unwrap_or_else(|p| p.into_inner()), q)?),
            Reader::Postgres(r) => r.summary(q),
        }
    }

    /// Tokens (prompt + completion) each tenant used in records that ended
    /// at or after `since_ms` (blocking; call from a blocking thread).
    pub fn tokens_by_tenant_since(&self, since_ms: i64) -> Result<HashMap<String, u64>, LedgerError> {
        match &self.reader {
            Reader::Sqlite(conn) => {
                Ok(sqlite::tokens_by_tenant_since(&conn.lock().unwrap_or_else(|p| p.into_inner()), since_ms)?)
            }
            Reader::Postgres(r) => r.tokens_by_tenant_since(since_ms),
        }
    }

    /// Stops taking records, commits what is queued and waits for the
    /// writer; a store that stays down gets [`CLOSE_GRACE`] more, then
    /// what it holds is logged as lost.
    pub fn close(&self) {
        self.close_within(CLOSE_GRACE);
    }

    /// [`Ledger::close`] with another grace for a store that stays down.
    pub fn close_within(&self, grace: Duration) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        self.closing.store(grace.as_millis().min(u128::from(u64::MAX - 1)) as u64, Ordering::Relaxed);
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
        if let Some(rt) = self.runtime.lock().unwrap_or_else(|p| p.into_inner()).take() {
            rt.shutdown_background();
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
fn write_loop(mut sink: impl Sink, rx: mpsc::Receiver<Op>, stats: &LedgerStats, closing: &AtomicU64) {
    let mut give_up_at = None;
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
            match sink.commit(&batch) {
                Ok(answers) => break Some(answers),
                Err(e) => {
                    // Keep the batch and try again: a full disk, a locked
                    // file or a database that is down must not lose records.
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    stats.failing.store(true, Ordering::Relaxed);
                    attempt += 1;
                    tracing::error!(error = %e, attempt, records = batch.len(), "ledger commit failed; retrying");
                    let mut pause = Duration::from_millis(200 * u64::from(attempt.min(25)));
                    let grace = closing.load(Ordering::Relaxed);
                    if grace != u64::MAX {
                        let at =
                            *give_up_at.get_or_insert_with(|| Instant::now() + Duration::from_millis(grace));
                        if Instant::now() >= at {
                            break None;
                        }
                        pause = pause.min(Duration::from_millis(500));
                    }
                    std::thread::sleep(pause);
                }
            }
        };
        let r = Ordering::Relaxed;
        stats.pending.fetch_sub(batch.len() as u64, r);
        let Some(answers) = answers else {
            let records: Vec<&UsageRecord> = batch
                .iter()
                .filter_map(|op| match op {
                    Op::Record { record, .. } => Some(&**record),
                    _ => None,
                })
                .collect();
            stats.lost.fetch_add(records.len() as u64, r);
            for record in records {
                tracing::error!(?record, "the ledger closed while its store was down: usage record lost");
            }
            continue;
        };
        stats.failing.store(false, r);
        stats.commits.fetch_add(1, r);
        stats.commit_micros.fetch_add(started.elapsed().as_micros() as u64, r);
        for (op, answer) in batch.into_iter().zip(answers) {
            match op {
                Op::Prune { reply, .. } => {
                    let _ = reply.send(answer.deleted);
                }
                Op::Record { done, .. } => {
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

/// Rates a request (`?5`: its X-Request-Id or response id) of tenant `?4`.
const RATE: &str = "UPDATE usage SET rating = ?1, feedback_comment = ?2, feedback_ts_ms = ?3 \
    WHERE tenant = ?4 AND (request_id = ?5 OR response_id = ?5) RETURNING model";

const PRUNE: &str = "DELETE FROM usage WHERE ts_ms < ?1";

/// What one committed operation answers its sender.
#[derive(Debug, Default)]
pub(crate) struct Answer {
    /// The model a feedback rated, if the tenant made that request.
    model: Option<String>,
    /// Rows a prune deleted.
    deleted: u64,
}

#[cfg(test)]
mod tests;
