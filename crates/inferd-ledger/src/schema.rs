//! The ledger's tables and connection settings.

use rusqlite::Connection;

use crate::Durability;

/// Schema version kept in `PRAGMA user_version`.
pub const VERSION: i64 = 1;

const CREATE: &str = "
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    response_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT,
    model TEXT NOT NULL,
    feature TEXT,
    route TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    cached_prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish_reason TEXT NOT NULL,
    outcome TEXT NOT NULL,
    queue_seconds REAL,
    ttft_seconds REAL,
    total_seconds REAL NOT NULL,
    ts_ms INTEGER NOT NULL,
    cost_usd REAL,
    prompt_text TEXT,
    completion_text TEXT,
    rating TEXT CHECK (rating IN ('up', 'down')),
    feedback_comment TEXT,
    feedback_ts_ms INTEGER
);
CREATE INDEX IF NOT EXISTS usage_tenant_ts ON usage (tenant, ts_ms);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts_ms);
CREATE INDEX IF NOT EXISTS usage_request_id ON usage (request_id);
CREATE INDEX IF NOT EXISTS usage_response_id ON usage (response_id);
";

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
    conn.execute_batch(CREATE)?;
    conn.pragma_update(None, "user_version", VERSION)?;
    Ok(())
}

/// `PRAGMA integrity_check`: "ok", or the problems found.
pub fn integrity_check(conn: &Connection) -> rusqlite::Result<String> {
    let rows: Vec<String> =
        conn.prepare("PRAGMA integrity_check")?.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(rows.join("; "))
}
