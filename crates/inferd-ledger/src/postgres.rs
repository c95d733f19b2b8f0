//! The ledger in PostgreSQL, shared by a fleet: the same table and queries
//! as the SQLite file, a migration at start, and commits a retry can repeat
//! without inserting a record twice (each record carries a unique key and
//! is inserted `ON CONFLICT DO NOTHING`, so a commit whose acknowledgement
//! was lost with the connection is harmless to redo).

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio_postgres::config::Host;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Row};

use crate::query::{Arg, Dialect, TOKENS_BY_TENANT_SINCE, VERSION};
use crate::{Answer, LedgerError, Op, PRUNE, RATE, Summary, SummaryRow, UsageQuery};

/// Longest wait for any one round of work with the database: a server that
/// stops answering (a network partition drops no connection) counts as
/// failed after this, and the writer reconnects.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection timeout when the URL sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Serializes schema changes of instances starting at once.
const MIGRATION_LOCK: i64 = 0x696e_6665_7264; // "inferd"

/// Every record of a batch in one statement: one array per column.
const INSERT: &str = "INSERT INTO usage (record_key, request_id, response_id, tenant, key_id, model, \
    feature, route, prompt_tokens, cached_prompt_tokens, completion_tokens, finish_reason, outcome, \
    queue_seconds, ttft_seconds, total_seconds, ts_ms, cost_usd, prompt_text, completion_text) \
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
    $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::bigint[], $12::text[], $13::text[], \
    $14::float8[], $15::float8[], $16::float8[], $17::bigint[], $18::float8[], $19::text[], $20::text[]) \
    ON CONFLICT (record_key) DO NOTHING";

/// `url` as it may be logged: user, hosts, ports and database, no password.
pub(crate) fn redact_url(url: &str) -> String {
    let Ok(config) = Config::from_str(url) else { return "postgres://(an unreadable URL)".into() };
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, port)| match h {
            Host::Tcp(name) => format!("{name}:{port}"),
            Host::Unix(path) => format!("{}:{port}", path.display()),
        })
        .collect();
    let user = config.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    format!("postgres://{user}{}/{}", hosts.join(","), config.get_dbname().unwrap_or(""))
}

/// How to reach the database, and the runtime its clients run on.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    config: Config,
    handle: Handle,
    display: String,
}

impl Store {
    pub(crate) fn new(url: &str, handle: Handle) -> Result<Self, LedgerError> {
        let display = redact_url(url);
        let mut config = Config::from_str(url)
            .map_err(|e| LedgerError::Connect { target: display.clone(), message: e.to_string() })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("inferd");
        }
        Ok(Store { config, handle, display })
    }

    /// Runs `work` on the ledger's runtime, from a thread outside it.
    fn run<T>(&self, work: impl Future<Output = Result<T, tokio_postgres::Error>>) -> Result<T, LedgerError> {
        self.handle.block_on(async {
            match tokio::time::timeout(QUERY_TIMEOUT, work).await {
                Ok(result) => result.map_err(LedgerError::Postgres),
                Err(_) => Err(LedgerError::Timeout(QUERY_TIMEOUT)),
            }
        })
    }

    async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(NoTls).await?;
        let target = self.display.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, ledger = %target, "the ledger's PostgreSQL connection closed");
            }
        });
        Ok(client)
    }

    /// Creates or updates the schema, retrying for up to `wait` while the
    /// database cannot be reached; refuses a schema newer than ours.
    pub(crate) fn migrate(&self, wait: Duration) -> Result<(), LedgerError> {
        let deadline = Instant::now() + wait;
        loop {
            let found = self.run(async {
                let mut client = self.connect().await?;
                let tx = client.transaction().await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
                tx.batch_execute(
                    "CREATE TABLE IF NOT EXISTS inferd_schema \
                     (id BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id), version INTEGER NOT NULL)",
                )
                .await?;
                let found: Option<i32> =
                    tx.query_opt("SELECT version FROM inferd_schema", &[]).await?.map(|r| r.get(0));
                if found.is_none_or(|v| i64::from(v) <= VERSION) {
                    tx.batch_execute(&Dialect::Postgres.schema()).await?;
                    tx.execute(
                        "INSERT INTO inferd_schema (version) VALUES ($1) \
                         ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version",
                        &[&(VERSION as i32)],
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok(found)
            });
            match found {
                Ok(Some(v)) if i64::from(v) > VERSION => {
                    return Err(LedgerError::Connect {
                        target: self.display.clone(),
                        message: format!(
                            "ledger schema version {v} is newer than this inferd's ({})",
                            VERSION
                        ),
                    });
                }
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, ledger = %self.display, "the ledger's database cannot be reached yet; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => {
                    return Err(LedgerError::Connect {
                        target: self.display.clone(),
                        message: e.to_string(),
                    });
                }
            }
        }
    }

    pub(crate) fn sink(&self) -> Sink {
        Sink { store: self.clone(), client: None, instance: format!("{:032x}", rand::random::<u128>()) }
    }

    pub(crate) fn reader(&self) -> Reader {
        Reader { store: self.clone(), client: Mutex::new(None) }
    }
}

/// The writer's connection, made (again) when needed.
#[derive(Debug)]
pub(crate) struct Sink {
    store: Store,
    client: Option<Client>,
    /// Random per ledger handle: with each record's sequence number, the
    /// record's unique key.
    instance: String,
}

impl crate::Sink for Sink {
    fn commit(&mut self, batch: &[Op]) -> Result<Vec<Answer>, LedgerError> {
        let store = self.store.clone();
        let (client, instance) = (&mut self.client, &self.instance);
        let result = store.run(async {
            if client.as_ref().is_none_or(Client::is_closed) {
                *client = Some(store.connect().await?);
            }
            let client = client.as_mut().expect("connected just now");
            commit(client, batch, instance).await
        });
        if result.is_err() {
            // The connection may be mid-transaction or dead: start afresh.
            self.client = None;
        }
        result
    }
}

async fn commit(
    client: &mut Client,
    batch: &[Op],
    instance: &str,
) -> Result<Vec<Answer>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let mut out = Vec::with_capacity(batch.len());
    let (rate, prune) = (Dialect::Postgres.sql(RATE), Dialect::Postgres.sql(PRUNE));
    let mut rest = batch;
    while let Some(op) = rest.first() {
        match op {
            Op::Record { .. } => {
                let run = rest.iter().take_while(|op| matches!(op, Op::Record { .. })).count();
                insert(&tx, &rest[..run], instance).await?;
                out.extend((0..run).map(|_| Answer::default()));
                rest = &rest[run..];
                continue;
            }
            Op::Prune { before_ms, .. } => {
                let deleted = tx.execute(&prune, &[before_ms]).await?;
                out.push(Answer { deleted, ..Default::default() });
            }
            Op::Feedback { tenant, request_id, rating, comment, ts_ms, .. } => {
                let rows = tx.query(&rate, &[&rating.as_str(), comment, ts_ms, tenant, request_id]).await?;
                out.push(Answer { model: rows.first().map(|r| r.get(0)), ..Default::default() });
            }
        }
        rest = &rest[1..];
    }
    tx.commit().await?;
    Ok(out)
}

/// Inserts a run of records with one statement.
async fn insert(
    tx: &tokio_postgres::Transaction<'_>,
    ops: &[Op],
    instance: &str,
) -> Result<(), tokio_postgres::Error> {
    let records: Vec<(&crate::UsageRecord, u64)> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Record { record, seq, .. } => Some((&**record, *seq)),
            _ => None,
        })
        .collect();
    let text = |f: fn(&crate::UsageRecord) -> &str| records.iter().map(|(r, _)| f(r)).collect::<Vec<_>>();
    let opt =
        |f: fn(&crate::UsageRecord) -> Option<&str>| records.iter().map(|(r, _)| f(r)).collect::<Vec<_>>();
    let int = |f: fn(&crate::UsageRecord) -> i64| records.iter().map(|(r, _)| f(r)).collect::<Vec<_>>();
    let real =
        |f: fn(&crate::UsageRecord) -> Option<f64>| records.iter().map(|(r, _)| f(r)).collect::<Vec<_>>();
    let keys: Vec<String> = records.iter().map(|(_, seq)| format!("{instance}-{seq}")).collect();
    let columns: [&(dyn ToSql + Sync); 20] = [
        &keys,
        &text(|r| &r.request_id),
        &text(|r| &r.response_id),
        &text(|r| &r.tenant),
        &opt(|r| r.key_id.as_deref()),
        &text(|r| &r.model),
        &opt(|r| r.feature.as_deref()),
        &text(|r| &r.route),
        &int(|r| r.prompt_tokens as i64),
        &int(|r| r.cached_prompt_tokens as i64),
        &int(|r| r.completion_tokens as i64),
        &text(|r| &r.finish_reason),
        &text(|r| &r.outcome),
        &real(|r| r.queue_seconds),
        &real(|r| r.ttft_seconds),
        &real(|r| Some(r.total_seconds)),
        &int(|r| r.ts_ms),
        &real(|r| r.cost_usd),
        &opt(|r| r.prompt_text.as_deref()),
        &opt(|r| r.completion_text.as_deref()),
    ];
    tx.execute(INSERT, &columns).await?;
    Ok(())
}

/// The read connection, made (again) when needed; reads run concurrently
/// on it.
#[derive(Debug)]
pub(crate) struct Reader {
    store: Store,
    client: Mutex<Option<Arc<Client>>>,
}

impl Reader {
    fn query(&self, sql: &str, args: Vec<Arg>) -> Result<Vec<Row>, LedgerError> {
        let cached = self.client.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let client = match cached.filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => {
                let c = Arc::new(self.store.run(self.store.connect())?);
                *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                c
            }
        };
        let params: Vec<Box<dyn ToSql + Sync + Send>> = args
            .into_iter()
            .map(|a| -> Box<dyn ToSql + Sync + Send> {
                match a {
                    Arg::Int(i) => Box::new(i),
                    Arg::Text(t) => Box::new(t),
                }
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
        self.store.run(client.query(sql, &refs))
    }

    pub(crate) fn summary(&self, q: &UsageQuery) -> Result<Summary, LedgerError> {
        let (sql, args) = q.sql(Dialect::Postgres);
        let n = q.group_by.len();
        let rows = self
            .query(&sql, args)?
            .iter()
            .map(|r| {
                let keys = (0..n).map(|i| r.try_get::<_, String>(i)).collect::<Result<_, _>>()?;
                let mut totals = [0i64; 6];
                for (i, t) in totals.iter_mut().enumerate() {
                    *t = r.try_get(n + i)?;
                }
                Ok(SummaryRow::from_columns(keys, totals, r.try_get(n + 6)?))
            })
            .collect::<Result<_, tokio_postgres::Error>>()?;
        Ok(Summary::from_rows(rows, n > 0))
    }

    pub(crate) fn tokens_by_tenant_since(&self, since_ms: i64) -> Result<HashMap<String, u64>, LedgerError> {
        let sql = Dialect::Postgres.sql(TOKENS_BY_TENANT_SINCE);
        let rows = self.query(&sql, vec![Arg::Int(since_ms)])?;
        rows.iter()
            .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)?.max(0) as u64)))
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(LedgerError::Postgres)
    }
}
