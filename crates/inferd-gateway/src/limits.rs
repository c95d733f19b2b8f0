//! Per-tenant limits: token buckets for requests and tokens per minute,
//! token quotas per UTC day and month, and a cap on concurrent requests.
//!
//! Tokens are charged at admission as prompt + max_tokens (the most the
//! request can use) and the unused part is given back when it ends, so a
//! tenant can never overshoot while requests are in flight.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::clock;
use crate::shared_limits::{Reservation, SharedLimits};

/// What a limiter does when the shared store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// Fall back to this instance's own buckets and quotas.
    Open,
    /// Refuse the request (503 with Retry-After).
    Closed,
}

/// The fleet-wide store a limiter checks rate limits and quotas against.
#[derive(Debug)]
struct Shared {
    store: SharedLimits,
    tenant: Arc<str>,
    on_failure: StoreFailure,
}

/// A tenant's limits as configured; `None` is unlimited.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent_requests: Option<u32>,
    pub tokens_per_day: Option<u64>,
    pub tokens_per_month: Option<u64>,
}

impl LimitsConfig {
    /// The first limit set to 0, which switches the tenant off.
    pub fn switched_off(&self) -> Option<LimitKind> {
        [
            (self.requests_per_minute.map(u64::from), LimitKind::RequestsPerMinute),
            (self.tokens_per_minute, LimitKind::TokensPerMinute),
            (self.max_concurrent_requests.map(u64::from), LimitKind::Concurrency),
            (self.tokens_per_day, LimitKind::DailyQuota),
            (self.tokens_per_month, LimitKind::MonthlyQuota),
        ]
        .into_iter()
        .find_map(|(v, kind)| (v == Some(0)).then_some(kind))
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    RequestsPerMinute,
    TokensPerMinute,
    Concurrency,
    DailyQuota,
    MonthlyQuota,
}

impl LimitKind {
    /// The config key naming it, also the `limit` of the error body and
    /// the `reason` label of the rejection metric.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "requests_per_minute",
            LimitKind::TokensPerMinute => "tokens_per_minute",
            LimitKind::Concurrency => "max_concurrent_requests",
            LimitKind::DailyQuota => "tokens_per_day",
            LimitKind::MonthlyQuota => "tokens_per_month",
        }
    }

    pub fn is_quota(self) -> bool {
        matches!(self, LimitKind::DailyQuota | LimitKind::MonthlyQuota)
    }
}

/// Why a request was refused by its tenant's limits.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Over a limit now; enough budget returns after `retry_after`.
    Exceeded { kind: LimitKind, limit: u64, requested: u64, available: u64, retry_after: Duration },
    /// Larger than the limit itself: it can never be admitted.
    TooLarge { kind: LimitKind, limit: u64, requested: u64 },
    /// The limit is 0: the tenant is switched off.
    SwitchedOff { kind: LimitKind },
    /// The shared limits store is unreachable and the policy is to refuse.
    StoreUnavailable { retry_after: Duration },
}

/// A bucket that holds up to `capacity` and refills at `capacity` per minute.
#[derive(Debug, Clone)]
struct TokenBucket {
    capacity: f64,
    level: f64,
    updated: Instant,
}

impl TokenBucket {
    fn new(capacity: u64, now: Instant) -> Self {
        TokenBucket { capacity: capacity as f64, level: capacity as f64, updated: now }
    }

    fn rate_per_sec(&self) -> f64 {
        self.capacity / 60.0
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + dt * self.rate_per_sec()).min(self.capacity);
        self.updated = now;
    }

    /// Time until the bucket holds `n`; zero when it already does, a day
    /// at most (an empty bucket of capacity 0 never refills).
    fn time_until(&self, n: f64) -> Duration {
        let missing = (n - self.level).max(0.0);
        if missing == 0.0 {
            return Duration::ZERO;
        }
        let secs = missing / self.rate_per_sec();
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX).min(Duration::from_secs(86_400))
    }

    fn give(&mut self, n: f64) {
        self.level = (self.level + n).min(self.capacity);
    }
}

/// Tokens used in one UTC day or month, plus those reserved by requests
/// still running.
#[derive(Debug, Clone)]
struct Quota {
    limit: u64,
    monthly: bool,
    window_start: i64,
    used: u64,
    reserved: u64,
}

impl Quota {
    fn window_of(monthly: bool, t: i64) -> i64 {
        if monthly { clock::month_start(t) } else { clock::day_start(t) }
    }

    fn window_end(&self) -> i64 {
        if self.monthly { clock::next_month_start(self.window_start) } else { self.window_start + 86_400 }
    }

    /// Starts a new window (used back to zero) once `unix` is past this one.
    fn roll(&mut self, unix: i64) {
        let start = Self::window_of(self.monthly, unix);
        if start != self.window_start {
            self.window_start = start;
            self.used = 0;
        }
    }

    fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used + self.reserved)
    }
}

/// What a tenant has in flight and left.
#[derive(Debug)]
struct State {
    requests: Option<TokenBucket>,
    tokens: Option<TokenBucket>,
    day: Option<Quota>,
    month: Option<Quota>,
    concurrent: u32,
}

/// The live limits of one tenant.
#[derive(Debug)]
pub struct Limiter {
    config: LimitsConfig,
    state: Mutex<State>,
    /// Set when rate limits and quotas are the fleet's, in Redis.
    shared: OnceLock<Shared>,
}

/// The request and token buckets as the `x-ratelimit-*` headers show them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketView {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// An admitted request's hold on its tenant's limits: one concurrency slot
/// and its token charge. Settling gives back what it did not use; dropping
/// it unsettled (the request never ran) gives everything back.
#[derive(Debug)]
pub struct Ticket {
    limiter: Arc<Limiter>,
    charge: u64,
    settled: bool,
    /// Held in the shared store (else in this instance's buckets and quotas).
    remote: Option<Reservation>,
}

impl Limiter {
    /// A limiter whose quotas start with `used_day` and `used_month` tokens
    /// already spent (from the ledger, so quotas survive restarts).
    pub fn new(config: LimitsConfig, used_day: u64, used_month: u64, unix: i64) -> Arc<Self> {
        let now = Instant::now();
        let quota = |limit: Option<u64>, monthly: bool, used: u64| {
            limit.map(|limit| Quota {
                limit,
                monthly,
                window_start: Quota::window_of(monthly, unix),
                used,
                reserved: 0,
            })
        };
        let state = State {
            requests: config.requests_per_minute.map(|n| TokenBucket::new(u64::from(n), now)),
            tokens: config.tokens_per_minute.map(|n| TokenBucket::new(n, now)),
            day: quota(config.tokens_per_day, false, used_day),
            month: quota(config.tokens_per_month, true, used_month),
            concurrent: 0,
        };
        Arc::new(Limiter { config, state: Mutex::new(state), shared: OnceLock::new() })
    }

    /// From now on, checks rate limits and quotas against `store` (shared
    /// by the fleet) as `tenant`; the concurrency cap stays this instance's.
    pub fn share(&self, store: SharedLimits, tenant: Arc<str>, on_failure: StoreFailure) {
        let _ = self.shared.set(Shared { store, tenant, on_failure });
    }

    /// Admits one request, against the fleet's shared budget when a store
    /// is set (see [`Limiter::share`]), else as [`Limiter::admit`].
    pub async fn admit_shared(self: &Arc<Self>, charge: u64) -> Result<Ticket, Refusal> {
        let Some(shared) = self.shared.get() else { return self.admit(charge) };
        if let Some(kind) = self.config.switched_off() {
            return Err(Refusal::SwitchedOff { kind });
        }
        let c = &self.config;
        for (limit, kind, requested) in [
            (c.requests_per_minute.map(u64::from), LimitKind::RequestsPerMinute, 1),
            (c.tokens_per_minute, LimitKind::TokensPerMinute, charge),
            (c.tokens_per_day, LimitKind::DailyQuota, charge),
            (c.tokens_per_month, LimitKind::MonthlyQuota, charge),
        ] {
            if let Some(limit) = limit.filter(|&l| requested > l) {
                return Err(Refusal::TooLarge { kind, limit, requested });
            }
        }
        self.take_slot()?;
        let seed = self.quota_used();
        let seed = (seed.0.unwrap_or(0), seed.1.unwrap_or(0));
        match shared.store.admit(&shared.tenant, c, charge, seed).await {
            Ok(Ok(reservation)) => {
                Ok(Ticket { limiter: self.clone(), charge, settled: false, remote: Some(reservation) })
            }
            Ok(Err(refusal)) => {
                self.release_slot();
                Err(refusal)
            }
            Err(e) => {
                self.release_slot();
                let policy = if shared.on_failure == StoreFailure::Open { "open" } else { "closed" };
                metrics::counter!(crate::metrics::LIMITS_STORE_ERRORS_TOTAL, "policy" => policy).increment(1);
                tracing::warn!(error = %e, tenant = %shared.tenant, policy, "the shared limits store failed");
                match shared.on_failure {
                    StoreFailure::Open => self.admit(charge),
                    StoreFailure::Closed => {
                        Err(Refusal::StoreUnavailable { retry_after: Duration::from_secs(1) })
                    }
                }
            }
        }
    }

    /// Takes a concurrency slot (the one limit a shared store leaves here).
    fn take_slot(&self) -> Result<(), Refusal> {
        let mut s = self.lock();
        self.check_slot(&s)?;
        s.concurrent += 1;
        Ok(())
    }

    /// Refuses when every concurrency slot is taken.
    fn check_slot(&self, s: &State) -> Result<(), Refusal> {
        match self.config.max_concurrent_requests {
            Some(max) if s.concurrent >= max => Err(Refusal::Exceeded {
                kind: LimitKind::Concurrency,
                limit: u64::from(max),
                requested: 1,
                available: 0,
                retry_after: Duration::from_secs(1),
            }),
            _ => Ok(()),
        }
    }

    fn release_slot(&self) {
        let mut s = self.lock();
        s.concurrent = s.concurrent.saturating_sub(1);
    }

    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every
        // update is a few plain assignments.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one request that may use up to `charge` tokens, or says which
    /// limit refuses it. Checks everything before taking anything.
    pub fn admit(self: &Arc<Self>, charge: u64) -> Result<Ticket, Refusal> {
        self.admit_at(charge, Instant::now(), clock::now_unix())
    }

    fn admit_at(self: &Arc<Self>, charge: u64, now: Instant, unix: i64) -> Result<Ticket, Refusal> {
        if let Some(kind) = self.config.switched_off() {
            return Err(Refusal::SwitchedOff { kind });
        }
        let mut guard = self.lock();
        let s = &mut *guard;
        self.check_slot(s)?;
        for (quota, kind) in [(&mut s.day, LimitKind::DailyQuota), (&mut s.month, LimitKind::MonthlyQuota)] {
            let Some(q) = quota else { continue };
            q.roll(unix);
            if charge > q.limit {
                return Err(Refusal::TooLarge { kind, limit: q.limit, requested: charge });
            }
            if charge > q.available() {
                return Err(Refusal::Exceeded {
                    kind,
                    limit: q.limit,
                    requested: charge,
                    available: q.available(),
                    retry_after: Duration::from_secs((q.window_end() - unix).max(1) as u64),
                });
            }
        }
        for (bucket, kind, n) in [
            (&mut s.requests, LimitKind::RequestsPerMinute, 1),
            (&mut s.tokens, LimitKind::TokensPerMinute, charge),
        ] {
            let Some(b) = bucket else { continue };
            b.refill(now);
            if n as f64 > b.capacity {
                return Err(Refusal::TooLarge { kind, limit: b.capacity as u64, requested: n });
            }
            if (n as f64) > b.level {
                return Err(Refusal::Exceeded {
                    kind,
                    limit: b.capacity as u64,
                    requested: n,
                    available: b.level as u64,
                    retry_after: b.time_until(n as f64),
                });
            }
        }
        // Everything fits: take it.
        s.concurrent += 1;
        if let Some(b) = &mut s.requests {
            b.level -= 1.0;
        }
        if let Some(b) = &mut s.tokens {
            b.level -= charge as f64;
        }
        for q in [&mut s.day, &mut s.month].into_iter().flatten() {
            q.reserved += charge;
        }
        Ok(Ticket { limiter: self.clone(), charge, settled: false, remote: None })
    }

    /// The request and token buckets now, for the response headers; none
    /// while the fleet's shared store counts them (this instance's buckets
    /// would say nothing true).
    pub fn buckets(&self) -> (Option<BucketView>, Option<BucketView>) {
        if self.shared.get().is_some() {
            return (None, None);
        }
        let now = Instant::now();
        let mut guard = self.lock();
        let s = &mut *guard;
        let view = |b: &mut TokenBucket| {
            b.refill(now);
            BucketView {
                limit: b.capacity as u64,
                remaining: b.level.max(0.0) as u64,
                reset: b.time_until(b.capacity),
            }
        };
        let requests = s.requests.as_mut().map(view);
        let tokens = s.tokens.as_mut().map(view);
        (requests, tokens)
    }

    /// Tokens used in the current day and month windows (for tests and /v1/usage).
    pub fn quota_used(&self) -> (Option<u64>, Option<u64>) {
        let unix = clock::now_unix();
        let mut guard = self.lock();
        let s = &mut *guard;
        let used = |q: &mut Option<Quota>| {
            q.as_mut().map(|q| {
                q.roll(unix);
                q.used
            })
        };
        let day = used(&mut s.day);
        (day, used(&mut s.month))
    }

    /// A request held in the shared store ended: frees its slot and counts
    /// what it used in this instance's quota view (which seeds windows the
    /// store has not seen).
    fn settle_remote(&self, used: u64, unix: i64) {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.concurrent = s.concurrent.saturating_sub(1);
        for q in [&mut s.day, &mut s.month].into_iter().flatten() {
            q.roll(unix);
            q.used += used;
        }
    }

    fn settle(&self, charge: u64, used: u64, ran: bool, unix: i64) {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.concurrent = s.concurrent.saturating_sub(1);
        if let Some(b) = &mut s.tokens {
            b.give(charge.saturating_sub(used) as f64);
        }
        if !ran && let Some(b) = &mut s.requests {
            b.give(1.0);
        }
        for q in [&mut s.day, &mut s.month].into_iter().flatten() {
            q.reserved = q.reserved.saturating_sub(charge);
            // A reservation made in a window that has since ended charges
            // the window the request ended in.
            q.roll(unix);
            q.used += used;
        }
    }
}

impl Ticket {
    /// The request ended having used `used` tokens (prompt + completion).
    pub fn settle(mut self, used: u64) {
        self.settled = true;
        self.end(used, true);
    }

    fn end(&mut self, used: u64, ran: bool) {
        let Some(reservation) = self.remote.take() else {
            self.limiter.settle(self.charge, used, ran, clock::now_unix());
            return;
        };
        self.limiter.settle_remote(used, clock::now_unix());
        // Giving back what was not used needs the store; off the request's path.
        if let (Some(shared), Ok(rt)) = (self.limiter.shared.get(), tokio::runtime::Handle::try_current()) {
            let store = shared.store.clone();
            rt.spawn(async move {
                if let Err(e) = store.settle(&reservation, used, ran).await {
                    tracing::warn!(error = %e, "unused tokens not given back to the shared limits store");
                }
            });
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled {
            self.end(0, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(config: LimitsConfig) -> Arc<Limiter> {
        Limiter::new(config, 0, 0, clock::now_unix())
    }

    #[test]
    fn a_zero_limit_switches_the_tenant_off_without_panicking() {
        for (config, kind) in [
            (
                LimitsConfig { requests_per_minute: Some(0), ..Default::default() },
                LimitKind::RequestsPerMinute,
            ),
            (LimitsConfig { tokens_per_minute: Some(0), ..Default::default() }, LimitKind::TokensPerMinute),
            (LimitsConfig { max_concurrent_requests: Some(0), ..Default::default() }, LimitKind::Concurrency),
            (LimitsConfig { tokens_per_day: Some(0), ..Default::default() }, LimitKind::DailyQuota),
            (LimitsConfig { tokens_per_month: Some(0), ..Default::default() }, LimitKind::MonthlyQuota),
        ] {
            let l = limiter(config);
            assert_eq!(l.admit(5).err(), Some(Refusal::SwitchedOff { kind }));
            // The response headers' view of an empty bucket that never refills.
            let (requests, tokens) = l.buckets();
            for b in [requests, tokens].into_iter().flatten() {
                assert_eq!((b.limit, b.remaining, b.reset), (0, 0, Duration::ZERO));
            }
        }
    }

    #[test]
    fn time_until_is_bounded() {
        let b = TokenBucket { capacity: 1e-300, level: 0.0, updated: Instant::now() };
        assert_eq!(b.time_until(1e300), Duration::from_secs(86_400));
    }

    #[test]
    fn request_bucket_refuses_then_refills_at_its_rate() {
        let l = limiter(LimitsConfig { requests_per_minute: Some(2), ..Default::default() });
        let t0 = Instant::now();
        let unix = clock::now_unix();
        let a = l.admit_at(1, t0, unix).unwrap();
        let b = l.admit_at(1, t0, unix).unwrap();
        a.settle(1);
        b.settle(1);
        match l.admit_at(1, t0, unix) {
            Err(Refusal::Exceeded { kind: LimitKind::RequestsPerMinute, retry_after, .. }) => {
                // One request per 30 s.
                assert!((retry_after.as_secs_f64() - 30.0).abs() < 0.01, "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
        assert!(l.admit_at(1, t0 + Duration::from_secs(29), unix).is_err());
        assert!(l.admit_at(1, t0 + Duration::from_secs(31), unix).is_ok());
    }

    #[test]
    fn unused_tokens_are_refunded_and_unrun_requests_cost_nothing() {
        let l = limiter(LimitsConfig { tokens_per_minute: Some(1000), ..Default::default() });
        let (t0, unix) = (Instant::now(), clock::now_unix());
        let t = l.admit_at(600, t0, unix).unwrap();
        assert!(matches!(
            l.admit_at(600, t0, unix),
            Err(Refusal::Exceeded { kind: LimitKind::TokensPerMinute, available: 400, .. })
        ));
        t.settle(100); // used 100 of 600: 500 come back
        let t2 = l.admit_at(900, t0, unix).unwrap();
        drop(t2); // never ran: all 900 come back
        assert!(l.admit_at(900, t0, unix).is_ok());
        assert!(matches!(
            l.admit_at(1001, t0, unix),
            Err(Refusal::TooLarge { kind: LimitKind::TokensPerMinute, limit: 1000, requested: 1001 })
        ));
    }

    #[test]
    fn concurrency_cap_holds_until_requests_end() {
        let l = limiter(LimitsConfig { max_concurrent_requests: Some(1), ..Default::default() });
        let t = l.admit(10).unwrap();
        assert!(matches!(l.admit(10), Err(Refusal::Exceeded { kind: LimitKind::Concurrency, .. })));
        t.settle(5);
        assert!(l.admit(10).is_ok());
    }

    #[test]
    fn daily_quota_is_exhausted_then_resets_at_utc_midnight() {
        let midnight = clock::parse_time("2026-11-25").unwrap();
        let l = Limiter::new(
            LimitsConfig { tokens_per_day: Some(100), ..Default::default() },
            90,
            0,
            midnight + 3600,
        );
        let now = Instant::now();
        // 90 spent before a restart count: 10 left.
        let t = l.admit_at(10, now, midnight + 3600).unwrap();
        match l.admit_at(1, now, midnight + 3600) {
            Err(Refusal::Exceeded { kind: LimitKind::DailyQuota, retry_after, available: 0, .. }) => {
                assert_eq!(retry_after.as_secs(), 23 * 3600, "until the next UTC midnight");
            }
            other => panic!("{other:?}"),
        }
        t.limiter.settle(t.charge, 10, true, midnight + 3600);
        std::mem::forget(t);
        assert!(l.admit_at(1, now, midnight + 86_399).is_err(), "still the same day");
        // The next day the quota is whole again.
        let t = l.admit_at(100, now, midnight + 86_400).unwrap();
        assert_eq!(t.charge, 100);
        assert!(matches!(
            l.admit_at(101, now, midnight + 86_400),
            Err(Refusal::TooLarge { kind: LimitKind::DailyQuota, .. })
        ));
    }

    #[test]
    fn monthly_quota_resets_on_the_first() {
        let nov30 = clock::parse_time("2026-11-30T23:00:00Z").unwrap();
        let l = Limiter::new(LimitsConfig { tokens_per_month: Some(50), ..Default::default() }, 0, 50, nov30);
        let now = Instant::now();
        match l.admit_at(1, now, nov30) {
            Err(Refusal::Exceeded { kind: LimitKind::MonthlyQuota, retry_after, .. }) => {
                assert_eq!(retry_after.as_secs(), 3600);
            }
            other => panic!("{other:?}"),
        }
        assert!(l.admit_at(50, now, nov30 + 3600).is_ok());
    }

    #[test]
    fn headers_view_shows_remaining_and_time_to_full() {
        let l = limiter(LimitsConfig {
            requests_per_minute: Some(60),
            tokens_per_minute: Some(6000),
            ..Default::default()
        });
        let t = l.admit(600).unwrap();
        let (r, k) = l.buckets();
        let (r, k) = (r.unwrap(), k.unwrap());
        assert_eq!((r.limit, r.remaining), (60, 59));
        assert!(r.reset <= Duration::from_secs(1));
        assert_eq!(k.limit, 6000);
        assert!((5399..=5400).contains(&k.remaining), "{}", k.remaining);
        assert!((5.9..=6.0).contains(&k.reset.as_secs_f64()), "{:?}", k.reset);
        drop(t);
    }
}
