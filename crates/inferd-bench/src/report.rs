//! A run's figures: what goes to the terminal, the JSON and the plots.
//! Field names are stable (README "inferd bench serve" documents them);
//! a new field may be added, none renamed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::args::{Endpoint, Load, Slo, SloMetric};
use crate::client::Outcome;

pub const SCHEMA: &str = "inferd-bench-serve/1";

/// Mean and percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dist {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// The value at quantile `q` of sorted `xs` (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Dist {
    pub fn of(mut xs: Vec<f64>) -> Dist {
        if xs.is_empty() {
            return Dist::default();
        }
        xs.sort_by(f64::total_cmp);
        Dist {
            count: xs.len(),
            mean: xs.iter().sum::<f64>() / xs.len() as f64,
            p50: quantile(&xs, 0.5),
            p90: quantile(&xs, 0.9),
            p99: quantile(&xs, 0.99),
            max: xs[xs.len() - 1],
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadPoint {
    /// `concurrency` (closed loop) or `rate` (open loop).
    pub mode: String,
    pub concurrency: Option<usize>,
    /// Requests per second; `null` for `inf`.
    pub request_rate: Option<f64>,
    pub burstiness: Option<f64>,
    pub max_concurrency: Option<usize>,
}

impl LoadPoint {
    pub fn of(load: Load) -> LoadPoint {
        match load {
            Load::Concurrency(c) => LoadPoint {
                mode: "concurrency".into(),
                concurrency: Some(c),
                request_rate: None,
                burstiness: None,
                max_concurrency: None,
            },
            Load::Rate { per_s, burstiness, max_concurrency } => LoadPoint {
                mode: "rate".into(),
                concurrency: None,
                request_rate: per_s.is_finite().then_some(per_s),
                burstiness: Some(burstiness),
                max_concurrency,
            },
        }
    }

    /// `c=16` or `rate=2.5/s` (`rate=inf`).
    pub fn name(&self) -> String {
        match (self.concurrency, self.request_rate) {
            (Some(c), _) => format!("c={c}"),
            (None, Some(r)) => format!("rate={r}/s"),
            (None, None) => "rate=inf".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// `random` or the prompt file's path.
    pub source: String,
    pub input_len: usize,
    pub output_len: usize,
    pub range_ratio: f64,
    pub seed: u64,
    pub num_prompts: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Requests {
    pub total: usize,
    pub ok: usize,
    pub failed: usize,
    /// By HTTP status (`"200"`, `"429"`, ...), `"error"` for no status.
    pub by_status: BTreeMap<String, usize>,
    /// A few failure messages, for the terminal.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub requests_per_s: f64,
    pub input_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goodput {
    /// The SLOs, milliseconds by metric name.
    pub slo_ms: BTreeMap<String, f64>,
    /// Requests per second that succeeded and met every SLO.
    pub requests_per_s: f64,
    /// Their share of all requests.
    pub fraction: f64,
}

/// One run: one point of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub schema: String,
    pub label: Option<String>,
    pub base_url: String,
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    pub load: LoadPoint,
    pub workload: Workload,
    /// Seconds since the Unix epoch when the run started.
    pub started_at: u64,
    pub duration_s: f64,
    pub requests: Requests,
    /// Tokens of successful requests, from the server's usage.
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub throughput: Throughput,
    pub ttft_ms: Dist,
    pub itl_ms: Dist,
    pub tpot_ms: Dist,
    pub e2e_ms: Dist,
    pub goodput: Option<Goodput>,
    /// What an inferd server's `/stats` counted during the run; absent for
    /// other servers.
    #[serde(default)]
    pub server: Option<ServerStats>,
    /// Every successful request's TTFT and every inter-token gap, in
    /// milliseconds, for the distribution plots.
    pub samples: Samples,
}

/// Differences of inferd's `/stats` counters over a run: where the engine
/// thread's time went, and what the scheduler did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerStats {
    pub engine_steps: u64,
    /// Seconds the engine spent inside steps (model forward and sampling).
    pub engine_step_s: f64,
    /// Seconds the engine thread spent between steps while work waited
    /// (commands, token delivery, counters): serving overhead.
    pub engine_between_steps_s: f64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    pub prefill_capped_steps: u64,
}

impl ServerStats {
    /// The counters' growth from `before` to `after` (two `/stats` bodies);
    /// `None` unless both carry inferd's engine counters.
    pub fn between(before: &serde_json::Value, after: &serde_json::Value) -> Option<ServerStats> {
        let d = |k: &str| Some(after.get(k)?.as_u64()?.saturating_sub(before.get(k)?.as_u64()?));
        Some(ServerStats {
            engine_steps: d("engine_steps")?,
            engine_step_s: d("engine_step_micros")? as f64 / 1e6,
            engine_between_steps_s: d("engine_between_steps_micros")? as f64 / 1e6,
            generated_tokens: d("generated_tokens")?,
            preemptions: d("num_preemptions").unwrap_or(0),
            prefill_capped_steps: d("num_prefill_capped_steps").unwrap_or(0),
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Samples {
    pub ttft_ms: Vec<f64>,
    pub itl_ms: Vec<f64>,
}

fn meets(o: &Outcome, slos: &[Slo]) -> bool {
    o.ok && slos.iter().all(|s| {
        let v = match s.metric {
            SloMetric::Ttft => o.ttft.map(ms),
            SloMetric::Itl => Some(o.itl.iter().max().map_or(0.0, |d| ms(*d))),
            SloMetric::Tpot => Some(o.tpot().map_or(0.0, ms)),
            SloMetric::E2e => Some(ms(o.e2e)),
        };
        v.is_some_and(|v| v <= s.ms)
    })
}

/// What describes a run besides its outcomes.
#[derive(Debug, Clone)]
pub struct RunSetup {
    pub label: Option<String>,
    pub base_url: String,
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    pub load: Load,
    pub workload: Workload,
    pub started_at: u64,
    pub slos: Vec<Slo>,
}

impl Run {
    pub fn new(setup: RunSetup, outcomes: &[Outcome], duration: Duration) -> Run {
        let secs = duration.as_secs_f64().max(1e-9);
        let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
        let mut by_status = BTreeMap::new();
        for o in outcomes {
            let key = o.status.map_or("error".to_string(), |s| s.to_string());
            *by_status.entry(key).or_insert(0) += 1;
        }
        let mut errors: Vec<String> = outcomes.iter().filter_map(|o| o.error.clone()).collect();
        errors.sort();
        errors.dedup();
        errors.truncate(5);
        let input_tokens: u64 = ok.iter().map(|o| o.prompt_tokens).sum();
        let output_tokens: u64 = ok.iter().map(|o| o.output_tokens).sum();
        let ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft.map(ms)).collect();
        let itl: Vec<f64> = ok.iter().flat_map(|o| o.itl.iter().map(|d| ms(*d))).collect();
        let goodput = (!setup.slos.is_empty()).then(|| {
            let good = outcomes.iter().filter(|o| meets(o, &setup.slos)).count();
            Goodput {
                slo_ms: setup.slos.iter().map(|s| (s.metric.name().to_string(), s.ms)).collect(),
                requests_per_s: good as f64 / secs,
                fraction: if outcomes.is_empty() { 0.0 } else { good as f64 / outcomes.len() as f64 },
            }
        });
        Run {
            schema: SCHEMA.into(),
            label: setup.label,
            base_url: setup.base_url,
            endpoint: setup.endpoint,
            model: setup.model,
            stream: setup.stream,
            load: LoadPoint::of(setup.load),
            workload: setup.workload,
            started_at: setup.started_at,
            duration_s: secs,
            requests: Requests {
                total: outcomes.len(),
                ok: ok.len(),
                failed: outcomes.len() - ok.len(),
                by_status,
                errors,
            },
            input_tokens,
            output_tokens,
            throughput: Throughput {
                requests_per_s: ok.len() as f64 / secs,
                input_tokens_per_s: input_tokens as f64 / secs,
                output_tokens_per_s: output_tokens as f64 / secs,
                total_tokens_per_s: (input_tokens + output_tokens) as f64 / secs,
            },
            ttft_ms: Dist::of(ttft.clone()),
            itl_ms: Dist::of(itl.clone()),
            tpot_ms: Dist::of(ok.iter().filter_map(|o| o.tpot().map(ms)).collect()),
            e2e_ms: Dist::of(ok.iter().map(|o| ms(o.e2e)).collect()),
            goodput,
            server: None,
            samples: Samples { ttft_ms: ttft, itl_ms: itl },
        }
    }
}

/// The runs as a terminal table, one row per run.
pub fn table(runs: &[Run]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<12} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "load",
        "ok/all",
        "req/s",
        "in tok/s",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "TPOT p50",
        "E2E p50",
        "goodput"
    );
    for r in runs {
        let good = r.goodput.as_ref().map_or("-".to_string(), |g| format!("{:.2}/s", g.requests_per_s));
        let _ = writeln!(
            s,
            "{:<12} {:>7} {:>8.2} {:>9.1} {:>9.1} {:>9.0} {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>9.0} {:>9}",
            r.load.name(),
            format!("{}/{}", r.requests.ok, r.requests.total),
            r.throughput.requests_per_s,
            r.throughput.input_tokens_per_s,
            r.throughput.output_tokens_per_s,
            r.ttft_ms.p50,
            r.ttft_ms.p99,
            r.itl_ms.p50,
            r.itl_ms.p99,
            r.tpot_ms.p50,
            r.e2e_ms.p50,
            good
        );
    }
    let _ = writeln!(
        s,
        "(latencies in ms; {} over {} runs)",
        runs.first().map_or("", |r| r.model.as_str()),
        runs.len()
    );
    for r in runs {
        if let Some(sv) = &r.server {
            let busy = sv.engine_step_s + sv.engine_between_steps_s;
            let share = if busy > 0.0 { 100.0 * sv.engine_between_steps_s / busy } else { 0.0 };
            let _ = writeln!(
                s,
                "{}: inferd ran {} steps, {:.2} s in steps, {:.2} s between them ({share:.1} % overhead), {} capped prefills, {} preemptions",
                r.load.name(),
                sv.engine_steps,
                sv.engine_step_s,
                sv.engine_between_steps_s,
                sv.prefill_capped_steps,
                sv.preemptions
            );
        }
    }
    for r in runs.iter().filter(|r| r.requests.failed > 0) {
        let _ = writeln!(
            s,
            "{}: {} failed {:?}: {}",
            r.load.name(),
            r.requests.failed,
            r.requests.by_status,
            r.requests.errors.join(" | ")
        );
    }
    s
}

/// Reads a `--json` file: one run per line.
pub fn read_runs(path: &std::path::Path) -> anyhow::Result<Vec<Run>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str::<Run>(l).map_err(|e| {
                anyhow::anyhow!("{} run {}: not an inferd bench run: {e}", path.display(), i + 1)
            })
        })
        .collect()
}

/// A named figure of a run, as tables and plots read it.
pub type Figure = (&'static str, fn(&Run) -> f64);

/// Two sets of runs side by side, paired by load point; `B/A` per figure.
pub fn compare(a: &[Run], b: &[Run], names: (&str, &str)) -> String {
    let mut s = String::new();
    let figures: [Figure; 7] = [
        ("out tok/s", |r| r.throughput.output_tokens_per_s),
        ("req/s", |r| r.throughput.requests_per_s),
        ("TTFT p50 ms", |r| r.ttft_ms.p50),
        ("TTFT p99 ms", |r| r.ttft_ms.p99),
        ("ITL p50 ms", |r| r.itl_ms.p50),
        ("ITL p99 ms", |r| r.itl_ms.p99),
        ("E2E p50 ms", |r| r.e2e_ms.p50),
    ];
    let _ = writeln!(s, "A = {}\nB = {}", names.0, names.1);
    let _ = writeln!(s, "{:<12} {:<12} {:>11} {:>11} {:>7}", "load", "figure", "A", "B", "B/A");
    let mut unmatched = 0;
    for ra in a {
        let Some(rb) = b.iter().find(|rb| rb.load == ra.load) else {
            unmatched += 1;
            continue;
        };
        for (name, f) in figures {
            let (x, y) = (f(ra), f(rb));
            let ratio = if x > 0.0 { format!("{:.2}", y / x) } else { "-".into() };
            let _ = writeln!(s, "{:<12} {:<12} {:>11.2} {:>11.2} {:>7}", ra.load.name(), name, x, y, ratio);
        }
    }
    unmatched += b.iter().filter(|rb| !a.iter().any(|ra| ra.load == rb.load)).count();
    if unmatched > 0 {
        let _ = writeln!(s, "({unmatched} runs had no partner at the same load and are left out)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let d = Dist::of((1..=100).map(f64::from).rev().collect());
        assert_eq!((d.p50, d.p90, d.p99, d.max, d.count), (50.0, 90.0, 99.0, 100.0, 100));
        assert_eq!(d.mean, 50.5);
        assert_eq!(Dist::of(vec![]), Dist::default());
        assert_eq!(Dist::of(vec![7.0]).p99, 7.0);
    }

    fn outcome(ok: bool, ttft_ms: u64, gaps_ms: &[u64], status: Option<u16>) -> Outcome {
        let itl: Vec<Duration> = gaps_ms.iter().map(|&g| Duration::from_millis(g)).collect();
        let e2e = Duration::from_millis(ttft_ms) + itl.iter().sum::<Duration>();
        Outcome {
            ok,
            status,
            ttft: ok.then(|| Duration::from_millis(ttft_ms)),
            output_tokens: if ok { itl.len() as u64 + 1 } else { 0 },
            prompt_tokens: if ok { 10 } else { 0 },
            itl,
            e2e,
            error: (!ok).then(|| "HTTP 429: slow down".to_string()),
        }
    }

    fn setup(slos: Vec<Slo>) -> RunSetup {
        RunSetup {
            label: Some("t".into()),
            base_url: "http://x".into(),
            endpoint: Endpoint::Completions,
            model: "m".into(),
            stream: true,
            load: Load::Concurrency(2),
            workload: Workload {
                source: "random".into(),
                input_len: 10,
                output_len: 3,
                range_ratio: 0.0,
                seed: 0,
                num_prompts: 3,
            },
            started_at: 0,
            slos,
        }
    }

    #[test]
    fn a_run_counts_tokens_of_successes_and_goodput_of_those_within_slo() {
        let outs = [
            outcome(true, 100, &[10, 10], Some(200)),
            outcome(true, 900, &[10, 50], Some(200)),
            outcome(false, 0, &[], Some(429)),
        ];
        let slos = vec!["ttft:500".parse().unwrap(), "itl:20".parse().unwrap()];
        let run = Run::new(setup(slos), &outs, Duration::from_secs(2));
        assert_eq!((run.requests.ok, run.requests.failed), (2, 1));
        assert_eq!(run.requests.by_status.get("429"), Some(&1));
        assert_eq!((run.input_tokens, run.output_tokens), (20, 6));
        assert_eq!(run.throughput.output_tokens_per_s, 3.0);
        assert_eq!(run.ttft_ms.count, 2);
        assert_eq!(run.itl_ms.count, 4);
        let g = run.goodput.as_ref().unwrap();
        assert_eq!((g.requests_per_s, g.fraction), (0.5, 1.0 / 3.0));
        // The JSON reads back as the same run, and the table names the failures.
        let back: Run = serde_json::from_str(&serde_json::to_string(&run).unwrap()).unwrap();
        assert_eq!(back, run);
        let t = table(&[run]);
        assert!(t.contains("c=2") && t.contains("2/3") && t.contains("slow down"), "{t}");
    }

    #[test]
    fn compare_pairs_runs_by_load() {
        let outs = [outcome(true, 100, &[10, 10], Some(200))];
        let a = Run::new(setup(vec![]), &outs, Duration::from_secs(1));
        let mut b = Run::new(setup(vec![]), &outs, Duration::from_secs(2));
        b.label = Some("b".into());
        let mut c = b.clone();
        c.load = LoadPoint::of(Load::Concurrency(9));
        let t = compare(&[a], &[b, c], ("a", "b"));
        assert!(t.contains("out tok/s") && t.contains("0.50"), "{t}");
        assert!(t.contains("1 runs had no partner"), "{t}");
    }

    #[test]
    fn slos_parse_and_bad_ones_are_refused() {
        let s: Slo = "TTFT:250".parse().unwrap();
        assert_eq!((s.metric, s.ms), (SloMetric::Ttft, 250.0));
        assert!("ttft".parse::<Slo>().is_err());
        assert!("foo:1".parse::<Slo>().unwrap_err().contains("unknown"));
        assert!("tpot:-1".parse::<Slo>().is_err());
    }
}
