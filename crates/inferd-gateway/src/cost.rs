//! Cost per token from the instance's hourly price and measured throughput.
//!
//! Every few seconds we sample two running totals: tokens metered (prompt +
//! completion of ended requests) and the engine's busy time (seconds spent
//! in steps). Over a sliding window, throughput = tokens / busy seconds,
//! and cost per token = hourly cost / 3600 / throughput. Busy time, not
//! wall time, so the price of a token does not depend on how idle the
//! instance happened to be; idle capacity is visible as utilization, not
//! hidden in per-token prices.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Least busy time a window needs before its throughput is trusted.
const MIN_BUSY: Duration = Duration::from_millis(200);

/// USD per million tokens for an instance costing `hourly_usd` that
/// processes `tokens_per_sec`.
fn per_million(hourly_usd: f64, tokens_per_sec: f64) -> f64 {
    hourly_usd / 3600.0 / tokens_per_sec * 1e6
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    tokens: u64,
    busy_micros: u64,
}

/// The cost model of one served model.
#[derive(Debug)]
pub struct CostTracker {
    hourly_usd: Option<f64>,
    window: Duration,
    tokens: AtomicU64,
    samples: Mutex<VecDeque<Sample>>,
    /// The last trusted estimate, kept through idle windows.
    last: Mutex<Option<f64>>,
}

impl CostTracker {
    pub fn new(hourly_usd: Option<f64>, window: Duration) -> Self {
        CostTracker {
            hourly_usd: hourly_usd.filter(|c| c.is_finite() && *c >= 0.0),
            window,
            tokens: AtomicU64::new(0),
            samples: Mutex::new(VecDeque::new()),
            last: Mutex::new(None),
        }
    }

    /// Counts tokens of an ended request.
    pub fn add_tokens(&self, n: u64) {
        self.tokens.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes a sample of the totals; returns (tokens per busy second, USD per
    /// million tokens) over the window, when measured.
    pub fn sample(&self, busy_micros: u64) -> Option<(f64, Option<f64>)> {
        self.sample_at(Instant::now(), busy_micros)
    }

    fn sample_at(&self, now: Instant, busy_micros: u64) -> Option<(f64, Option<f64>)> {
        let tokens = self.tokens.load(Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back(Sample { at: now, tokens, busy_micros });
        while samples.len() > 2 && samples.get(1).is_some_and(|s| now.duration_since(s.at) >= self.window) {
            samples.pop_front();
        }
        let first = *samples.front()?;
        let busy = Duration::from_micros(busy_micros.saturating_sub(first.busy_micros));
        let done = tokens.saturating_sub(first.tokens);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if busy >= MIN_BUSY && done > 0 {
            let throughput = done as f64 / busy.as_secs_f64();
            *last = Some(throughput);
        }
        last.map(|t| (t, self.hourly_usd.map(|c| per_million(c, t))))
    }

    /// USD per million tokens now, when a price is set and throughput
    /// measured. Before the first window has measured anything, the
    /// lifetime totals stand in (`busy_micros`: the engine's busy time so far).
    pub fn per_million(&self, busy_micros: u64) -> Option<f64> {
        let hourly = self.hourly_usd?;
        let measured = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        let throughput = measured.or_else(|| {
            let tokens = self.tokens.load(Ordering::Relaxed);
            (busy_micros > 0 && tokens > 0).then(|| tokens as f64 / (busy_micros as f64 / 1e6))
        })?;
        Some(per_million(hourly, throughput))
    }

    /// The estimated cost of `tokens` tokens.
    pub fn estimate(&self, tokens: u64, busy_micros: u64) -> Option<f64> {
        self.per_million(busy_micros).map(|m| m * tokens as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_follows_busy_throughput_over_the_window() {
        let c = CostTracker::new(Some(3.6), Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(c.sample_at(t0, 0), None, "nothing measured yet");
        assert_eq!(c.estimate(1000, 0), None);
        // 1,000 tokens in 1 busy second: $0.001 per busy second, so $1 per 1M tokens.
        c.add_tokens(1000);
        let (tput, per_m) = c.sample_at(t0 + Duration::from_secs(10), 1_000_000).unwrap();
        assert!((tput - 1000.0).abs() < 1e-9);
        assert!((per_m.unwrap() - 1.0).abs() < 1e-9);
        assert!((c.estimate(500, 1_000_000).unwrap() - 0.0005).abs() < 1e-12);
        // Idle for a long while: the last estimate stands.
        let (tput, _) = c.sample_at(t0 + Duration::from_secs(200), 1_000_000).unwrap();
        assert!((tput - 1000.0).abs() < 1e-9);
        // Twice as fast in the new window: half the price.
        c.add_tokens(4000);
        let (tput, per_m) = c.sample_at(t0 + Duration::from_secs(210), 3_000_000).unwrap();
        assert!((tput - 2000.0).abs() < 1e-9, "{tput}");
        assert!((per_m.unwrap() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn no_price_means_no_cost_but_throughput_is_measured() {
        let c = CostTracker::new(None, Duration::from_secs(60));
        let t0 = Instant::now();
        c.sample_at(t0, 0);
        c.add_tokens(10);
        let (tput, per_m) = c.sample_at(t0 + Duration::from_secs(1), 500_000).unwrap();
        assert!((tput - 20.0).abs() < 1e-9);
        assert_eq!(per_m, None);
        assert_eq!(c.estimate(10, 500_000), None);
    }

    #[test]
    fn lifetime_totals_price_the_first_requests() {
        let c = CostTracker::new(Some(3.6), Duration::from_secs(60));
        c.add_tokens(100);
        // 100 tokens in 0.05 busy seconds: 2,000 tokens/s, $0.5 per million.
        assert!((c.per_million(50_000).unwrap() - 0.5).abs() < 1e-9);
    }
}
