//! The last few minutes of serving, for the console: time to first token
//! and inter-token latency percentiles, output tokens, finished requests and
//! rejections by reason, in fixed slots of wall-clock time.
//!
//! Prometheus histograms count from process start, and a dashboard
//! subtracts scrapes to see the present. The console has no Prometheus, so
//! the server keeps a short history of its own: [`SLOTS`] slots of
//! [`SLOT_SECS`] seconds, each holding log-bucketed latency histograms.
//! Buckets are 10 % wide and a percentile reads as its bucket's geometric
//! middle, so a reported p99 is within 5 % of the true sample.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{LazyLock, Mutex};

use serde_json::{Value, json};

/// Seconds one slot covers.
pub const SLOT_SECS: u64 = 10;
/// Slots kept: five minutes.
pub const SLOTS: u64 = 30;

/// The smallest latency told apart from zero (100 µs) and the bucket ratio.
const LOWEST: f64 = 1e-4;
const RATIO: f64 = 1.1;
/// Buckets up to about 1,000 s; longer samples land in the last.
const BUCKETS: usize = 170;

/// A histogram of latencies in geometric buckets.
#[derive(Debug, Clone)]
struct LogHistogram {
    counts: Vec<u32>,
    total: u64,
}

impl Default for LogHistogram {
    fn default() -> Self {
        LogHistogram { counts: vec![0; BUCKETS], total: 0 }
    }
}

fn bucket_of(secs: f64) -> usize {
    if secs.is_nan() || secs <= LOWEST {
        return 0;
    }
    ((secs / LOWEST).ln() / RATIO.ln()).floor().clamp(0.0, (BUCKETS - 1) as f64) as usize
}

/// The value a bucket stands for: the geometric middle of its bounds.
fn bucket_value(i: usize) -> f64 {
    LOWEST * RATIO.powf(i as f64 + 0.5)
}

impl LogHistogram {
    fn record(&mut self, secs: f64) {
        self.counts[bucket_of(secs)] += 1;
        self.total += 1;
    }

    fn merge(&mut self, other: &LogHistogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }

    /// The `q` quantile (0..=1), or `None` without samples.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        // The smallest value with at least q of the samples at or below it.
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return Some(bucket_value(i));
            }
        }
        None
    }

    fn json(&self) -> Value {
        let ms = |q| self.quantile(q).map(|s| (s * 1e5).round() / 1e2);
        json!({"count": self.total, "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99)})
    }
}

#[derive(Debug, Default, Clone)]
struct Slot {
    /// Unix seconds / SLOT_SECS.
    index: u64,
    ttft: LogHistogram,
    itl: LogHistogram,
    finished: u64,
    failed: u64,
    rejected: BTreeMap<&'static str, u64>,
}

impl Slot {
    fn output_tokens(&self) -> u64 {
        self.ttft.total + self.itl.total
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Slots with something in them, oldest first; empty slots are absent.
    slots: VecDeque<Slot>,
    /// Rejections since the process started.
    rejected_total: BTreeMap<&'static str, u64>,
}

/// The recent history of one process.
#[derive(Debug, Default)]
pub struct Recent {
    inner: Mutex<Inner>,
}

/// The server's wall clock (the one quotas and usage use).
fn now_ms() -> u64 {
    u64::try_from(crate::clock::now_unix_ms()).unwrap_or(0)
}

impl Inner {
    fn slot(&mut self, now_ms: u64) -> &mut Slot {
        let index = now_ms / 1000 / SLOT_SECS;
        while self.slots.front().is_some_and(|s| s.index + SLOTS <= index) {
            self.slots.pop_front();
        }
        // A clock stepped backwards writes into the newest slot.
        if self.slots.back().is_none_or(|s| s.index < index) {
            self.slots.push_back(Slot { index, ..Default::default() });
        }
        self.slots.back_mut().expect("a slot was just ensured")
    }
}

impl Recent {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A sequence's first token, `secs` after its request arrived.
    pub fn first_token(&self, secs: f64) {
        self.first_token_at(now_ms(), secs)
    }

    fn first_token_at(&self, now_ms: u64, secs: f64) {
        self.with(|i| i.slot(now_ms).ttft.record(secs));
    }

    /// A later token, `secs` after the one before.
    pub fn next_token(&self, secs: f64) {
        self.next_token_at(now_ms(), secs)
    }

    fn next_token_at(&self, now_ms: u64, secs: f64) {
        self.with(|i| i.slot(now_ms).itl.record(secs));
    }

    /// A sequence ended, with an error or not.
    pub fn finished(&self, failed: bool) {
        self.finished_at(now_ms(), failed)
    }

    fn finished_at(&self, now_ms: u64, failed: bool) {
        self.with(|i| {
            let s = i.slot(now_ms);
            s.finished += 1;
            s.failed += u64::from(failed);
        });
    }

    /// A request refused before it ran, with the reason `/metrics` gives.
    pub fn rejected(&self, reason: &'static str) {
        self.rejected_at(now_ms(), reason)
    }

    fn rejected_at(&self, now_ms: u64, reason: &'static str) {
        self.with(|i| {
            *i.slot(now_ms).rejected.entry(reason).or_default() += 1;
            *i.rejected_total.entry(reason).or_default() += 1;
        });
    }

    /// The history as JSON: one entry per slot of the window, oldest first
    /// (empty slots included, so a chart's x axis is time), and the window's
    /// totals.
    pub fn json(&self) -> Value {
        self.json_at(now_ms())
    }

    fn json_at(&self, now_ms: u64) -> Value {
        self.with(|i| {
            let newest = now_ms / 1000 / SLOT_SECS;
            let oldest = newest.saturating_sub(SLOTS - 1);
            let mut window = Slot::default();
            let empty = Slot::default();
            let mut slots = Vec::new();
            for index in oldest..=newest {
                let s = i.slots.iter().find(|s| s.index == index).unwrap_or(&empty);
                window.ttft.merge(&s.ttft);
                window.itl.merge(&s.itl);
                window.finished += s.finished;
                window.failed += s.failed;
                for (reason, n) in &s.rejected {
                    *window.rejected.entry(reason).or_default() += n;
                }
                slots.push(json!({
                    "start": index * SLOT_SECS,
                    "output_tokens": s.output_tokens(),
                    "tokens_per_second": s.output_tokens() as f64 / SLOT_SECS as f64,
                    "requests_finished": s.finished,
                    "requests_failed": s.failed,
                    "requests_rejected": s.rejected.values().sum::<u64>(),
                    "ttft": s.ttft.json(),
                    "itl": s.itl.json(),
                }));
            }
            json!({
                "slot_seconds": SLOT_SECS,
                "window_seconds": SLOT_SECS * SLOTS,
                "now": now_ms / 1000,
                "slots": slots,
                "window": {
                    "output_tokens": window.output_tokens(),
                    "requests_finished": window.finished,
                    "requests_failed": window.failed,
                    "rejections": window.rejected,
                    "ttft": window.ttft.json(),
                    "itl": window.itl.json(),
                },
                "rejections_total": i.rejected_total,
            })
        })
    }
}

/// This process's history.
pub fn recent() -> &'static Recent {
    static RECENT: LazyLock<Recent> = LazyLock::new(Recent::default);
    &RECENT
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_790_000_000_000;

    #[test]
    fn quantiles_are_within_five_percent_of_the_samples() {
        let mut h = LogHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        // 1..=1000 ms: the p50 is 500 ms, the p99 990 ms, the p90 900 ms.
        for ms in 1..=1000 {
            h.record(ms as f64 / 1e3);
        }
        for (q, want) in [(0.5, 0.5), (0.9, 0.9), (0.99, 0.99), (1.0, 1.0)] {
            let got = h.quantile(q).unwrap();
            assert!((got / want - 1.0).abs() < 0.05, "q{q}: {got} vs {want}");
        }
        // The extremes clamp instead of indexing out of range.
        h.record(1e9);
        h.record(-1.0);
        h.record(f64::NAN);
        assert_eq!(h.total, 1003);
    }

    #[test]
    fn slots_keep_five_minutes_and_fill_gaps() {
        let r = Recent::default();
        r.first_token_at(T0, 0.2);
        r.next_token_at(T0, 0.05);
        r.next_token_at(T0 + 1_000, 0.05);
        r.finished_at(T0 + 1_000, false);
        r.rejected_at(T0 + 25_000, "queue_full");
        r.rejected_at(T0 + 25_000, "queue_full");
        r.finished_at(T0 + 25_000, true);
        let j = r.json_at(T0 + 30_000);
        let slots = j["slots"].as_array().unwrap();
        assert_eq!(slots.len(), SLOTS as usize);
        let starts: Vec<u64> = slots.iter().map(|s| s["start"].as_u64().unwrap()).collect();
        assert!(starts.windows(2).all(|w| w[1] == w[0] + SLOT_SECS), "{starts:?}");
        assert_eq!(*starts.last().unwrap(), (T0 + 30_000) / 1000 / SLOT_SECS * SLOT_SECS);
        let first = slots.iter().find(|s| s["output_tokens"] == 3).expect("the slot of T0");
        assert_eq!(first["ttft"]["count"], 1);
        assert_eq!(first["itl"]["count"], 2);
        assert_eq!(first["requests_finished"], 1);
        let w = &j["window"];
        assert_eq!(w["output_tokens"], 3);
        assert_eq!(w["requests_finished"], 2);
        assert_eq!(w["requests_failed"], 1);
        assert_eq!(w["rejections"]["queue_full"], 2);
        let p50 = w["ttft"]["p50_ms"].as_f64().unwrap();
        assert!((p50 / 200.0 - 1.0).abs() < 0.05, "{p50}");
        // Six minutes on, the old slots have left the window; the totals stay.
        r.next_token_at(T0 + 360_000, 0.01);
        let j = r.json_at(T0 + 360_000);
        assert_eq!(j["window"]["output_tokens"], 1);
        assert_eq!(j["window"]["rejections"], json!({}));
        assert_eq!(j["rejections_total"]["queue_full"], 2);
        assert!(r.with(|i| i.slots.len()) <= SLOTS as usize);
    }

    #[test]
    fn a_clock_stepped_back_writes_into_the_newest_slot() {
        let r = Recent::default();
        r.next_token_at(T0 + 60_000, 0.01);
        r.next_token_at(T0, 0.01);
        assert_eq!(r.with(|i| i.slots.len()), 1);
        assert_eq!(r.json_at(T0 + 60_000)["window"]["output_tokens"], 2);
    }
}
