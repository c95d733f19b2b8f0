//! `inferd bench serve`: drives an OpenAI-compatible server with a
//! reproducible workload, closed loop at a concurrency or open loop at a
//! request rate (a sweep of either), and reports throughput, TTFT,
//! inter-token latency, TPOT, end-to-end latency and goodput as a table,
//! JSON Lines and PNG plots.

pub mod args;
pub mod client;
pub mod plot;
pub mod report;
pub mod workload;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Gamma};
use serde_json::Value;

pub use args::{BenchCommand, ServeBench};
use args::{Endpoint, Load};
use client::Outcome;
use report::{Run, RunSetup, Workload};
use workload::Item;

/// Runs `inferd bench` and its subcommands.
pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Serve(args) => serve(*args).await,
    }
}

fn route(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Completions => "/v1/completions",
        Endpoint::Chat => "/v1/chat/completions",
    }
}

/// The first model the server lists.
async fn first_model(client: &reqwest::Client, base: &str, key: Option<&str>) -> anyhow::Result<String> {
    let mut req = client.get(format!("{base}/v1/models"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.map_err(|e| anyhow::anyhow!("cannot reach {base}: {e}"))?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    anyhow::ensure!(status.is_success(), "GET {base}/v1/models answered {status}: {v}");
    v["data"][0]["id"].as_str().map(str::to_string).ok_or_else(|| {
        anyhow::anyhow!(
            "{base}/v1/models lists no model (still loading?); wait for it or name one with --model"
        )
    })
}

/// inferd's `/stats`, or `None` from a server that has none.
async fn server_stats(client: &reqwest::Client, base: &str, key: Option<&str>) -> Option<Value> {
    let mut req = client.get(format!("{base}/stats"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

fn progress(n: usize, name: &str) -> ProgressBar {
    // Drawn only on a terminal (stderr); hidden in CI logs and pipes.
    let bar = ProgressBar::new(n as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(name.to_string());
    bar
}

/// Everything a request needs, shared by the tasks of a run.
struct Shared {
    client: reqwest::Client,
    url: String,
    key: Option<String>,
    endpoint: Endpoint,
    bodies: Vec<Value>,
}

impl Shared {
    /// Sends request `i` of the run.
    async fn send(&self, i: usize) -> Outcome {
        client::send(&self.client, &self.url, self.key.as_deref(), &self.bodies[i], self.endpoint).await
    }
}

/// Closed loop: `c` clients, each sending the next request when its last ends.
async fn closed_loop(shared: Arc<Shared>, c: usize, bar: &ProgressBar) -> (Vec<Outcome>, Duration) {
    let n = shared.bodies.len();
    let next = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(vec![Outcome::default(); n]));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..c.min(n) {
        let (shared, next, outcomes, bar) = (shared.clone(), next.clone(), outcomes.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let o = shared.send(i).await;
                bar.inc(1);
                if let Ok(mut all) = outcomes.lock() {
                    all[i] = o;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let took = t0.elapsed();
    let outcomes = outcomes.lock().map(|o| o.clone()).unwrap_or_default();
    (outcomes, took)
}

/// Arrival times of `n` requests at `per_s` a second with gamma-distributed
/// gaps of shape `burstiness` (1: exponential, a Poisson process).
pub fn arrivals(n: usize, per_s: f64, burstiness: f64, seed: u64) -> Vec<Duration> {
    if !per_s.is_finite() {
        return vec![Duration::ZERO; n];
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_a771_7a15);
    // Mean gap 1/per_s: shape × scale.
    let gamma = Gamma::new(burstiness, 1.0 / (per_s * burstiness)).ok();
    let mut t = 0.0;
    (0..n)
        .map(|i| {
            if i > 0 {
                t += gamma.as_ref().map_or(1.0 / per_s, |g| g.sample(&mut rng));
            }
            Duration::from_secs_f64(t)
        })
        .collect()
}

/// Open loop: request `i` is sent at `at[i]` (while fewer than `max` are in flight).
async fn open_loop(
    shared: Arc<Shared>,
    at: Vec<Duration>,
    max: Option<usize>,
    bar: &ProgressBar,
) -> (Vec<Outcome>, Duration) {
    let gate = Arc::new(tokio::sync::Semaphore::new(max.unwrap_or(tokio::sync::Semaphore::MAX_PERMITS)));
    let t0 = Instant::now();
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for (i, when) in at.into_iter().enumerate() {
        tokio::time::sleep_until(start + when).await;
        let permit = gate.clone().acquire_owned().await;
        let (shared, bar) = (shared.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let o = shared.send(i).await;
            drop(permit);
            bar.inc(1);
            o
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(
            t.await.unwrap_or_else(|e| Outcome { error: Some(format!("task: {e}")), ..Default::default() }),
        );
    }
    (outcomes, t0.elapsed())
}

fn items(args: &ServeBench, n: usize, seed: u64) -> anyhow::Result<Vec<Item>> {
    match &args.prompts {
        Some(path) => workload::from_file(path, n, args.output_len),
        None => Ok(workload::random(args, n, seed)),
    }
}

fn write_json(path: &Path, runs: &[Run]) -> anyhow::Result<()> {
    let mut text = String::new();
    for r in runs {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// `inferd bench serve`.
pub async fn serve(args: ServeBench) -> anyhow::Result<()> {
    if let Some(files) = &args.compare {
        let a = report::read_runs(&files[0])?;
        let b = report::read_runs(&files[1])?;
        let names = (files[0].display().to_string(), files[1].display().to_string());
        print!("{}", report::compare(&a, &b, (&names.0, &names.1)));
        if let Some(dir) = &args.plot {
            for p in plot::write(dir, &[a, b].concat())? {
                eprintln!("wrote {}", p.display());
            }
        }
        return Ok(());
    }
    let base = args.base_url.trim_end_matches('/').to_string();
    anyhow::ensure!(
        base.starts_with("http://"),
        "--base-url must be plain http://HOST:PORT (this build speaks no TLS), got {base}"
    );
    let runs = args.runs().map_err(|e| anyhow::anyhow!(e))?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(args.timeout.max(0.001)))
        .pool_max_idle_per_host(usize::MAX)
        .build()?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&client, &base, args.api_key.as_deref()).await?,
    };
    let url = format!("{base}{}", route(args.endpoint));
    eprintln!(
        "inferd bench serve: {model} at {url}, {} requests, {} runs",
        if args.no_stream { "whole" } else { "streamed" },
        runs.len()
    );
    let shared_for = |bodies: Vec<Value>| {
        Arc::new(Shared {
            client: client.clone(),
            url: url.clone(),
            key: args.api_key.clone(),
            endpoint: args.endpoint,
            bodies,
        })
    };
    let body_of = |item: &Item| workload::body(item, args.endpoint, &model, &args);

    if args.warmup > 0 {
        let mut warm = items(&args, args.warmup, args.seed ^ 0x7a3)?;
        for w in &mut warm {
            w.max_tokens = w.max_tokens.min(16);
        }
        let bar = progress(warm.len(), "warm-up");
        let (outs, _) = closed_loop(shared_for(warm.iter().map(body_of).collect()), 4, &bar).await;
        bar.finish_and_clear();
        if let Some(e) = outs.iter().find_map(|o| o.error.clone()) {
            eprintln!("warm-up: a request failed: {e}");
        }
    }

    let mut done: Vec<Run> = Vec::new();
    for (i, (load, n)) in runs.into_iter().enumerate() {
        // The same seed gives each point of a sweep the same requests
        // whichever server is measured.
        let seed = args.seed.wrapping_add(i as u64);
        let list = items(&args, n, seed)?;
        let shared = shared_for(list.iter().map(body_of).collect());
        let point = report::LoadPoint::of(load);
        let bar = progress(n, &point.name());
        let stats_before = server_stats(&client, &base, args.api_key.as_deref()).await;
        let started_at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let (outcomes, took) = match load {
            Load::Concurrency(c) => closed_loop(shared, c, &bar).await,
            Load::Rate { per_s, burstiness, max_concurrency } => {
                open_loop(shared, arrivals(n, per_s, burstiness, seed), max_concurrency, &bar).await
            }
        };
        bar.finish_and_clear();
        let stats_after = server_stats(&client, &base, args.api_key.as_deref()).await;
        let mut run = Run::new(
            RunSetup {
                label: args.label.clone(),
                base_url: base.clone(),
                endpoint: args.endpoint,
                model: model.clone(),
                stream: !args.no_stream,
                load,
                workload: Workload {
                    source: args.prompts.as_ref().map_or("random".into(), |p| p.display().to_string()),
                    input_len: args.input_len,
                    output_len: args.output_len,
                    range_ratio: args.range_ratio,
                    seed: args.seed,
                    num_prompts: n,
                },
                started_at,
                slos: args.goodput.clone(),
            },
            &outcomes,
            took,
        );
        if let (Some(b), Some(a)) = (&stats_before, &stats_after) {
            run.server = report::ServerStats::between(b, a);
        }
        eprintln!(
            "{}: {}/{} ok, {:.1} output tok/s, TTFT p50 {:.0} ms, ITL p99 {:.1} ms",
            point.name(),
            run.requests.ok,
            run.requests.total,
            run.throughput.output_tokens_per_s,
            run.ttft_ms.p50,
            run.itl_ms.p99
        );
        done.push(run);
        // Rewritten after every run, so an interrupted sweep keeps what it measured.
        if let Some(path) = &args.json {
            write_json(path, &done)?;
        }
    }
    print!("{}", report::table(&done));
    if let Some(dir) = &args.plot {
        for p in plot::write(dir, &done)? {
            eprintln!("wrote {}", p.display());
        }
    }
    if let Some(r) = done.iter().find(|r| r.requests.ok == 0) {
        anyhow::bail!("every request of {} failed: {}", r.load.name(), r.requests.errors.join(" | "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_keep_the_rate_and_the_seed_fixes_them() {
        let at = arrivals(2000, 10.0, 1.0, 3);
        assert_eq!(at, arrivals(2000, 10.0, 1.0, 3));
        assert_eq!(at[0], Duration::ZERO);
        assert!(at.windows(2).all(|w| w[0] <= w[1]));
        let span = at[1999].as_secs_f64();
        assert!((170.0..230.0).contains(&span), "2000 arrivals at 10/s span about 200 s: {span}");
        // Burstier arrivals have more spread-out gaps at the same mean.
        let cv = |b: f64| {
            let a = arrivals(4000, 10.0, b, 1);
            let gaps: Vec<f64> = a.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64).sqrt() / mean
        };
        assert!(cv(0.25) > 1.5 && cv(1.0) > 0.8 && cv(1.0) < 1.2 && cv(8.0) < 0.5);
        assert!(arrivals(5, f64::INFINITY, 1.0, 0).iter().all(|d| d.is_zero()));
    }
}
