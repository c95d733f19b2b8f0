//! The ledger in a SQLite file: its tables, connection settings, commits
//! and reads.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, params, params_from_iter, types::Value};

use crate::query::{Arg, Dialect, TOKENS_BY_TENANT_SINCE, VERSION};
use crate::{Answer, Durability, LedgerError, Op, PRUNE, RATE, Summary, SummaryRow, UsageQuery};

/// Sets WAL mode and durability, creates the tables, and refuses a file
/// written by a newer inferd.
pub fn prepare(conn: &Connection, durability: Durability) -> rusqlite::Result<()> {
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "the ledger's file system does not support WAL; using {mode}");
    }
    let sync = match durability {
        Durability::Process => "NORMAL",
        Durability::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    // Request-id indexes are random-ordered: keep their pages in memory
    // (64 MiB) instead of rereading them from the OS on every insert.
    conn.pragma_update(None, "cache_size", -65_536)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > VERSION {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_MISMATCH),
            Some(format!("ledger schema version {version} is newer than this inferd's ({VERSION})")),
        ));
    }
    conn.execute_batch(&Dialect::Sqlite.schema())?;
    conn.pragma_update(None, "user_version", VERSION)?;
    Ok(())
}

/// `PRAGMA integrity_check`: "ok", or the problems found.
pub fn integrity_check(conn: &Connection) -> rusqlite::Result<String> {
    let rows: Vec<String> =
        conn.prepare("PRAGMA integrity_check")?.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(rows.join("; "))
}

pub(crate) fn open(path: &Path, flags: OpenFlags) -> Result<Connection, LedgerError> {
    let err = |source| LedgerError::Open { path: path.display().to_string(), source };
    let conn = Connection::open_with_flags(path, flags).map_err(err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
    Ok(conn)
}

const INSERT: &str = "INSERT INTO usage (request_id, response_id, tenant, key_id, model, feature, route, \
    prompt_tokens, cached_prompt_tokens, completion_tokens, finish_reason, outcome, queue_seconds, \
    ttft_seconds, total_seconds, ts_ms, cost_usd, prompt_text, completion_text) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)";

/// The writer's connection.
#[derive(Debug)]
pub(crate) struct SqliteSink(pub(crate) Connection);

impl crate::Sink for SqliteSink {
    fn commit(&mut self, batch: &[Op]) -> Result<Vec<Answer>, LedgerError> {
        let tx = self.0.transaction()?;
        let mut out = Vec::with_capacity(batch.len());
        {
            let mut insert = tx.prepare_cached(INSERT)?;
            let mut rate = tx.prepare_cached(RATE)?;
            for op in batch {
                match op {
                    Op::Record { record: r, .. } => {
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
                        let deleted = tx.execute(PRUNE, [before_ms])? as u64;
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
}

fn values(args: Vec<Arg>) -> impl Iterator<Item = Value> {
    args.into_iter().map(|a| match a {
        Arg::Int(i) => Value::Integer(i),
        Arg::Text(t) => Value::Text(t),
    })
}

/// Runs a usage summary on a ledger connection.
pub(crate) fn summary(conn: &Connection, q: &UsageQuery) -> rusqlite::Result<Summary> {
    let (sql, args) = q.sql(Dialect::Sqlite);
    let n = q.group_by.len();
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params_from_iter(values(args)), |r| {
        let mut totals = [0i64; 6];
        for (i, t) in totals.iter_mut().enumerate() {
            *t = r.get(n + i)?;
        }
        let keys = (0..n).map(|i| r.get::<_, String>(i)).collect::<Result<_, _>>()?;
        Ok(SummaryRow::from_columns(keys, totals, r.get(n + 6)?))
    })?;
    Ok(Summary::from_rows(rows.collect::<Result<_, _>>()?, n > 0))
}

/// Tokens (prompt + completion) each tenant used since `since_ms`.
pub(crate) fn tokens_by_tenant_since(
    conn: &Connection,
    since_ms: i64,
) -> rusqlite::Result<HashMap<String, u64>> {
    let mut stmt = conn.prepare(TOKENS_BY_TENANT_SINCE)?;
    let rows =
        stmt.query_map([since_ms], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?;
    rows.collect()
}
