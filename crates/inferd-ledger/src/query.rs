//! Usage summaries and the totals quotas start from, as SQL both stores
//! run.

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

    fn sql(self, dialect: Dialect) -> &'static str {
        match self {
            GroupBy::Model => "model",
            GroupBy::Feature => "COALESCE(feature, '')",
            GroupBy::Day => dialect.day(),
            GroupBy::Tenant => "tenant",
            GroupBy::Key => "COALESCE(key_id, '')",
        }
    }
}

/// The SQL both stores run is written once, in the portable subset of the
/// two, with `?N` placeholders; these are its only differences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The UTC day (`YYYY-MM-DD`) of `ts_ms`.
    fn day(self) -> &'static str {
        match self {
            Dialect::Sqlite => "strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch')",
            Dialect::Postgres => "to_char(to_timestamp(ts_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        }
    }

    /// `sql` with its placeholders in this dialect (PostgreSQL numbers
    /// them `$N`; our SQL has no `?` anywhere else).
    pub(crate) fn sql(self, sql: &str) -> String {
        match self {
            Dialect::Sqlite => sql.to_string(),
            Dialect::Postgres => sql.replace('?', "$"),
        }
    }
}

/// Schema version: SQLite keeps it in `PRAGMA user_version`, PostgreSQL in
/// the `inferd_schema` table.
pub const VERSION: i64 = 1;

/// The type of a column of `usage`.
#[derive(Clone, Copy)]
enum Col {
    Text,
    Int,
    Real,
}

/// The columns of `usage` after its id, and whether each is NOT NULL.
const COLUMNS: &[(&str, Col, bool)] = &[
    ("request_id", Col::Text, true),
    ("response_id", Col::Text, true),
    ("tenant", Col::Text, true),
    ("key_id", Col::Text, false),
    ("model", Col::Text, true),
    ("feature", Col::Text, false),
    ("route", Col::Text, true),
    ("prompt_tokens", Col::Int, true),
    ("cached_prompt_tokens", Col::Int, true),
    ("completion_tokens", Col::Int, true),
    ("finish_reason", Col::Text, true),
    ("outcome", Col::Text, true),
    ("queue_seconds", Col::Real, false),
    ("ttft_seconds", Col::Real, false),
    ("total_seconds", Col::Real, true),
    ("ts_ms", Col::Int, true),
    ("cost_usd", Col::Real, false),
    ("prompt_text", Col::Text, false),
    ("completion_text", Col::Text, false),
    ("rating", Col::Text, false),
    ("feedback_comment", Col::Text, false),
    ("feedback_ts_ms", Col::Int, false),
];

impl Dialect {
    fn col_type(self, col: Col) -> &'static str {
        match (self, col) {
            (_, Col::Text) => "TEXT",
            (Dialect::Sqlite, Col::Int) => "INTEGER",
            (Dialect::Postgres, Col::Int) => "BIGINT",
            (Dialect::Sqlite, Col::Real) => "REAL",
            (Dialect::Postgres, Col::Real) => "DOUBLE PRECISION",
        }
    }

    /// The `usage` table and its indexes, written once for both stores.
    /// PostgreSQL's rows also carry `record_key`, unique, which makes a
    /// retried commit insert each record once.
    pub(crate) fn schema(self) -> String {
        let mut cols = vec![match self {
            Dialect::Sqlite => "id INTEGER PRIMARY KEY".to_string(),
            Dialect::Postgres => "id BIGSERIAL PRIMARY KEY,\n    record_key TEXT NOT NULL".to_string(),
        }];
        for &(name, col, not_null) in COLUMNS {
            let check = if name == "rating" { " CHECK (rating IN ('up', 'down'))" } else { "" };
            let null = if not_null { " NOT NULL" } else { "" };
            cols.push(format!("{name} {}{null}{check}", self.col_type(col)));
        }
        let mut sql = format!("CREATE TABLE IF NOT EXISTS usage (\n    {}\n);\n", cols.join(",\n    "));
        if self == Dialect::Postgres {
            sql.push_str("CREATE UNIQUE INDEX IF NOT EXISTS usage_record_key ON usage (record_key);\n");
        }
        for (name, on) in [
            ("tenant_ts", "tenant, ts_ms"),
            ("ts", "ts_ms"),
            ("request_id", "request_id"),
            ("response_id", "response_id"),
        ] {
            sql.push_str(&format!("CREATE INDEX IF NOT EXISTS usage_{name} ON usage ({on});\n"));
        }
        sql
    }
}

/// A query parameter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Arg {
    Int(i64),
    Text(String),
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
    /// The summary's SQL and parameters. Its columns: the group keys, then
    /// six integer totals (see [`SummaryRow::from_columns`]), then the cost.
    pub(crate) fn sql(&self, dialect: Dialect) -> (String, Vec<Arg>) {
        let keys: Vec<&str> = self.group_by.iter().map(|g| g.sql(dialect)).collect();
        let select_keys = keys.iter().map(|k| format!("{k}, ")).collect::<String>();
        let mut sql = format!(
            "SELECT {select_keys}COUNT(*), CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cached_prompt_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), \
             COUNT(CASE WHEN rating = 'up' THEN 1 END), COUNT(CASE WHEN rating = 'down' THEN 1 END), \
             CAST(COALESCE(SUM(cost_usd), 0) AS DOUBLE PRECISION) \
             FROM usage WHERE ts_ms >= ?1 AND ts_ms < ?2"
        );
        let mut args = vec![Arg::Int(self.start_ms), Arg::Int(self.end_ms)];
        if let Some(t) = &self.tenant {
            sql.push_str(" AND tenant = ?3");
            args.push(Arg::Text(t.clone()));
        }
        if !keys.is_empty() {
            let list = keys.join(", ");
            sql.push_str(&format!(" GROUP BY {list} ORDER BY {list}"));
        }
        (dialect.sql(&sql), args)
    }
}

impl SummaryRow {
    /// A row from the summary's columns: keys, the six integer totals in
    /// their SELECT order, and the cost.
    pub(crate) fn from_columns(keys: Vec<String>, totals: [i64; 6], cost_usd: f64) -> Self {
        let [requests, prompt, cached, completion, up, down] = totals.map(|v| v.max(0) as u64);
        SummaryRow {
            keys,
            requests,
            prompt_tokens: prompt,
            cached_prompt_tokens: cached,
            completion_tokens: completion,
            cost_usd,
            thumbs_up: up,
            thumbs_down: down,
        }
    }
}

impl Summary {
    /// Rows as queried; an empty ungrouped query still has its one (zero)
    /// total row.
    pub(crate) fn from_rows(rows: Vec<SummaryRow>, grouped: bool) -> Self {
        let mut summary = Summary { rows };
        if !grouped && summary.rows.is_empty() {
            summary.rows.push(SummaryRow::default());
        }
        summary
    }
}

/// Tokens (prompt + completion) each tenant used in records that ended at
/// or after `?1`.
pub(crate) const TOKENS_BY_TENANT_SINCE: &str = "SELECT tenant, \
    CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) \
    FROM usage WHERE ts_ms >= ?1 GROUP BY tenant";
