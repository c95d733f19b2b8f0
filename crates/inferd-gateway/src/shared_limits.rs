//! Rate limits and quotas shared by every instance of a fleet, in Redis
//! (`--limits-store redis://...`). Each check is one server-side script, so
//! N instances admitting at once share one minute's budget exactly:
//!
//! - the request and token buckets of a tenant are hashes (`level`, `ts`)
//!   refilled from the Redis server's own clock (`TIME`), so instances'
//!   clocks do not matter;
//! - the daily and monthly token quotas are counters keyed by the window's
//!   UTC start, expiring after it, seeded on first use with what the
//!   instance knows was already used (its ledger).
//!
//! A request is charged prompt + max_tokens when admitted, and the unused
//! part is given back when it ends, as the in-process limiter does.
//! Concurrency caps stay per instance. What happens when Redis cannot be
//! reached is the caller's policy (fail open or closed).

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Client, Script};

use crate::clock;
use crate::limits::{LimitKind, LimitsConfig, Refusal};

/// Redis could not be reached or answered unexpectedly.
#[derive(Debug, thiserror::Error)]
#[error("the limits store failed: {0}")]
pub struct StoreError(String);

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError(e.to_string())
    }
}

/// Checks every limit before taking anything; refusals return the limit's
/// index (1 requests/min, 2 tokens/min, 3 day, 4 month), the limit, what
/// was available and milliseconds until enough is.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local charge = tonumber(ARGV[5])
local function level(key, cap)
  local h = redis.call('HMGET', key, 'level', 'ts')
  local l = tonumber(h[1]) or cap
  local ts = tonumber(h[2]) or now
  return math.min(cap, l + math.max(0, now - ts) * cap / 60)
end
local levels = {}
for i = 1, 2 do
  local cap = tonumber(ARGV[i])
  if cap >= 0 then
    local need = (i == 1) and 1 or charge
    local l = level(KEYS[i], cap)
    if l < need then
      return {0, i, cap, math.floor(l), math.ceil((need - l) * 60000 / cap)}
    end
    levels[i] = l - need
  end
end
for i = 3, 4 do
  local limit = tonumber(ARGV[i])
  if limit >= 0 then
    redis.call('SET', KEYS[i], ARGV[i + 3], 'NX', 'EX', ARGV[i + 5])
    local used = tonumber(redis.call('GET', KEYS[i]))
    if used + charge > limit then
      return {0, i, limit, math.max(0, limit - used), tonumber(ARGV[i + 5]) * 1000}
    end
  end
end
for i = 1, 2 do
  if levels[i] then
    redis.call('HSET', KEYS[i], 'level', levels[i], 'ts', now)
    redis.call('EXPIRE', KEYS[i], 120)
  end
end
for i = 3, 4 do
  if tonumber(ARGV[i]) >= 0 then redis.call('INCRBY', KEYS[i], charge) end
end
return {1}
"#;

/// Gives back what a request did not use: tokens to the token bucket and
/// to the quotas (and its request, if it never ran).
const SETTLE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local refund = {tonumber(ARGV[3]), tonumber(ARGV[4])}
for i = 1, 2 do
  local cap = tonumber(ARGV[i])
  if cap >= 0 and refund[i] > 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    local h = redis.call('HMGET', KEYS[i], 'level', 'ts')
    local l = math.min(cap, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * cap / 60 + refund[i])
    redis.call('HSET', KEYS[i], 'level', l, 'ts', now)
  end
end
for i = 3, 4 do
  if refund[2] > 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    local left = redis.call('DECRBY', KEYS[i], refund[2])
    if left < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
return 1
"#;

/// A connection to the shared store; cheap to clone.
#[derive(Clone)]
pub struct SharedLimits {
    conn: ConnectionManager,
    admit: Script,
    settle: Script,
    timeout: Duration,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

/// What one admitted request holds in the store, to settle when it ends.
#[derive(Debug, Clone)]
pub struct Reservation {
    tenant: String,
    config: LimitsConfig,
    charge: u64,
    unix: i64,
}

/// A limit as the scripts take it: -1 for none.
fn limit(v: Option<u64>) -> i64 {
    v.map_or(-1, |n| n.min(i64::MAX as u64) as i64)
}

impl SharedLimits {
    /// Connects to `url` (`redis://host:port/db`); each call waits at most
    /// `timeout` for Redis.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client = Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(timeout, ConnectionManager::new_with_config(client, config))
            .await
            .map_err(|_| StoreError(format!("no answer from {url} within {timeout:?}")))??;
        Ok(SharedLimits { conn, admit: Script::new(ADMIT), settle: Script::new(SETTLE), timeout })
    }

    fn keys(tenant: &str, unix: i64) -> [String; 4] {
        [
            format!("inferd:limits:{tenant}:requests"),
            format!("inferd:limits:{tenant}:tokens"),
            format!("inferd:quota:{tenant}:day:{}", clock::day_start(unix)),
            format!("inferd:quota:{tenant}:month:{}", clock::month_start(unix)),
        ]
    }

    /// Admits a request of `charge` tokens for `tenant` against the fleet's
    /// shared budget. `used_day`/`used_month` seed a quota window the store
    /// has not seen yet. Limits that need no store (0, or a charge larger
    /// than the limit itself) are the caller's to check first.
    pub async fn admit(
        &self,
        tenant: &str,
        config: &LimitsConfig,
        charge: u64,
        (used_day, used_month): (u64, u64),
    ) -> Result<Result<Reservation, Refusal>, StoreError> {
        let unix = clock::now_unix();
        let keys = Self::keys(tenant, unix);
        let ttl_day = clock::day_start(unix) + 86_400 - unix + 60;
        let ttl_month = clock::next_month_start(clock::month_start(unix)) - unix + 60;
        let mut call = self.admit.prepare_invoke();
        call.key(&keys[..])
            .arg(limit(config.requests_per_minute.map(u64::from)))
            .arg(limit(config.tokens_per_minute))
            .arg(limit(config.tokens_per_day))
            .arg(limit(config.tokens_per_month))
            .arg(charge)
            .arg(used_day)
            .arg(used_month)
            .arg(ttl_day)
            .arg(ttl_month);
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = tokio::time::timeout(self.timeout, call.invoke_async(&mut conn))
            .await
            .map_err(|_| StoreError(format!("no answer within {:?}", self.timeout)))??;
        match reply.as_slice() {
            [1] => Ok(Ok(Reservation { tenant: tenant.to_string(), config: config.clone(), charge, unix })),
            [0, which, limit, available, retry_ms] => {
                let kind = match which {
                    1 => LimitKind::RequestsPerMinute,
                    2 => LimitKind::TokensPerMinute,
                    3 => LimitKind::DailyQuota,
                    _ => LimitKind::MonthlyQuota,
                };
                Ok(Err(Refusal::Exceeded {
                    kind,
                    limit: *limit as u64,
                    requested: if kind == LimitKind::RequestsPerMinute { 1 } else { charge },
                    available: (*available).max(0) as u64,
                    retry_after: Duration::from_millis((*retry_ms).max(1) as u64),
                }))
            }
            other => Err(StoreError(format!("unexpected answer from the admit script: {other:?}"))),
        }
    }

    /// The request ended having used `used` tokens (`ran`: it reached the
    /// engine; a request that never ran gets its request back too).
    pub async fn settle(&self, r: &Reservation, used: u64, ran: bool) -> Result<(), StoreError> {
        let keys = Self::keys(&r.tenant, r.unix);
        let mut call = self.settle.prepare_invoke();
        call.key(&keys[..])
            .arg(limit(r.config.requests_per_minute.map(u64::from)))
            .arg(limit(r.config.tokens_per_minute))
            .arg(u64::from(!ran))
            .arg(r.charge.saturating_sub(used));
        let mut conn = self.conn.clone();
        let _: i64 = tokio::time::timeout(self.timeout, call.invoke_async(&mut conn))
            .await
            .map_err(|_| StoreError(format!("no answer within {:?}", self.timeout)))??;
        Ok(())
    }
}
