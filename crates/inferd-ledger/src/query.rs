//! Usage summaries and the totals quotas start from.

use std::collections::HashMap;

use rusqlite::{Connection, params_from_iter, types::Value};

/// A column summaries can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Model,
    Feature,
    Day,
    Tenant,
    /// The API key's id.
    Key,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "model" => Some(GroupBy::Model),
            "feature" => Some(GroupBy::Feature),
            "day" => Some(GroupBy::Day),
            "tenant" => Some(GroupBy::Tenant),
            "key" => Some(GroupBy::Key),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Model => "model",
            GroupBy::Feature => "feature",
            GroupBy::Day => "day",
            GroupBy::Tenant => "tenant",
            GroupBy::Key => "key",
        }
    }

    fn sql(self) -> &'static str {
        match self {
            GroupBy::Model => "model",
            GroupBy::Feature => "COALESCE(feature, '')",
            GroupBy::Day => "strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch')",
            GroupBy::Tenant => "tenant",
            GroupBy::Key => "COALESCE(key_id, '')",
        }
    }
}

/// Which records to summarize: ended in `[start_ms, end_ms)`, optionally
/// one tenant's, grouped by the listed columns (none: one total row).
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    pub start_ms: i64,
    pub end_ms: i64,
    pub tenant: Option<String>,
    pub group_by: Vec<GroupBy>,
}

/// One group's totals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SummaryRow {
    /// The group's values, in `group_by` order.
    pub keys: Vec<String>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    pub thumbs_up: u64,
    pub thumbs_down: u64,
}

impl SummaryRow {
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// Share of ratings that are thumbs up; `None` with no ratings.
    pub fn thumbs_up_share(&self) -> Option<f64> {
        let rated = self.thumbs_up + self.thumbs_down;
        (rated > 0).then(|| self.thumbs_up as f64 / rated as f64)
    }
}

/// A summary: its rows, ordered by their keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub rows: Vec<SummaryRow>,
}

impl UsageQuery {
    /// Runs the query on a ledger connection.
    pub fn run(&self, conn: &Connection) -> rusqlite::Result<Summary> {
        let keys: Vec<&str> = self.group_by.iter().map(|g| g.sql()).collect();
        let select_keys = keys.iter().map(|k| format!("{k}, ")).collect::<String>();
        let mut sql = format!(
            "SELECT {select_keys}COUNT(*), SUM(prompt_tokens), SUM(cached_prompt_tokens), \
             SUM(completion_tokens), TOTAL(cost_usd), SUM(rating = 'up'), SUM(rating = 'down') \
             FROM usage WHERE ts_ms >= ?1 AND ts_ms < ?2"
        );
        let mut args = vec![Value::Integer(self.start_ms), Value::Integer(self.end_ms)];
        if let Some(t) = &self.tenant {
            sql.push_str(" AND tenant = ?3");
            args.push(Value::Text(t.clone()));
        }
        if !keys.is_empty() {
            let list = keys.join(", ");
            sql.push_str(&format!(" GROUP BY {list} ORDER BY {list}"));
        }
        let n = keys.len();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params_from_iter(args), |r| {
            let int =
                |i: usize| -> rusqlite::Result<u64> { Ok(r.get::<_, Option<i64>>(i)?.unwrap_or(0) as u64) };
            Ok(SummaryRow {
                keys: (0..n).map(|i| r.get::<_, String>(i)).collect::<Result<_, _>>()?,
                requests: int(n)?,
                prompt_tokens: int(n + 1)?,
                cached_prompt_tokens: int(n + 2)?,
                completion_tokens: int(n + 3)?,
                cost_usd: r.get(n + 4)?,
                thumbs_up: int(n + 5)?,
                thumbs_down: int(n + 6)?,
            })
        })?;
        let mut summary = Summary { rows: rows.collect::<Result<_, _>>()? };
        // An empty ungrouped query still has its one (zero) total row.
        if n == 0 && summary.rows.is_empty() {
            summary.rows.push(SummaryRow::default());
        }
        Ok(summary)
    }
}

/// Tokens (prompt + completion) each tenant used in records that ended at
/// or after `since_ms`.
pub fn tokens_by_tenant_since(conn: &Connection, since_ms: i64) -> rusqlite::Result<HashMap<String, u64>> {
    let mut stmt = conn.prepare(
        "SELECT tenant, SUM(prompt_tokens + completion_tokens) FROM usage WHERE ts_ms >= ?1 GROUP BY tenant",
    )?;
    let rows = stmt.query_map([since_ms], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
    rows.collect()
}
