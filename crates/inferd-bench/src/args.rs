//! The flags of `inferd bench serve`.

use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, Subcommand, ValueEnum};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Drive an OpenAI-compatible server (inferd, vLLM, llama.cpp's server)
    /// with a reproducible workload and report throughput and latency.
    Serve(Box<ServeBench>),
}

/// Which OpenAI route the requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `/v1/completions`: the prompt as token ids (random workload) or text.
    Completions,
    /// `/v1/chat/completions`: the prompt as one user message.
    Chat,
}

/// How a random prompt is written in a completions request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PromptForm {
    /// A list of token ids: exactly the input length on every server.
    Ids,
    /// Random words: about one token per word; the server's usage says how many.
    Text,
}

/// A service-level objective for goodput: `ttft:MS`, `itl:MS`, `tpot:MS` or `e2e:MS`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slo {
    pub metric: SloMetric,
    pub ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SloMetric {
    Ttft,
    /// The request's worst inter-token gap.
    Itl,
    Tpot,
    E2e,
}

impl SloMetric {
    pub fn name(self) -> &'static str {
        match self {
            SloMetric::Ttft => "ttft",
            SloMetric::Itl => "itl",
            SloMetric::Tpot => "tpot",
            SloMetric::E2e => "e2e",
        }
    }
}

impl FromStr for Slo {
    type Err = String;
    fn from_str(s: &str) -> Result<Slo, String> {
        let (name, ms) = s.split_once(':').ok_or_else(|| format!("expected METRIC:MS, got {s:?}"))?;
        let metric = match name.trim().to_ascii_lowercase().as_str() {
            "ttft" => SloMetric::Ttft,
            "itl" => SloMetric::Itl,
            "tpot" => SloMetric::Tpot,
            "e2e" | "e2el" => SloMetric::E2e,
            other => return Err(format!("unknown SLO metric {other:?} (ttft, itl, tpot or e2e)")),
        };
        let ms: f64 = ms.trim().parse().map_err(|_| format!("{ms:?} is not a number of milliseconds"))?;
        if !(ms.is_finite() && ms > 0.0) {
            return Err(format!("an SLO must be a positive number of milliseconds, got {ms}"));
        }
        Ok(Slo { metric, ms })
    }
}

/// A request rate: requests per second, or `inf` (all at once).
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("inf") {
        return Ok(f64::INFINITY);
    }
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("a request rate is a positive number or inf, got {s:?}")),
    }
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a whole number of at least 1, got {s:?}")),
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..1.0).contains(&r) => Ok(r),
        _ => Err(format!("expected a ratio in [0, 1), got {s:?}")),
    }
}

fn parse_burstiness(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(b) if b.is_finite() && b > 0.0 => Ok(b),
        _ => Err(format!("burstiness is a positive number (1 = Poisson), got {s:?}")),
    }
}

#[derive(Debug, Args)]
pub struct ServeBench {
    /// The server's base URL (plain HTTP).
    #[arg(long, env = "INFERD_BENCH_URL", default_value = "http://127.0.0.1:8080")]
    pub base_url: String,
    /// Completions or chat.
    #[arg(long, value_enum, default_value_t = Endpoint::Completions)]
    pub endpoint: Endpoint,
    /// The model to ask for; default: the first one /v1/models lists.
    #[arg(long)]
    pub model: Option<String>,
    /// Bearer key sent with every request.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Ask for whole responses instead of SSE streams (TTFT is then the
    /// whole request, and there is no inter-token latency).
    #[arg(long)]
    pub no_stream: bool,

    /// Prompts from a JSONL file, one object per line: `{"prompt": "..."}`
    /// or `{"messages": [...]}`, optionally with `"max_tokens"`. Without
    /// it the prompts are random.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Input length in tokens of a random prompt.
    #[arg(long, default_value_t = 128, value_parser = parse_positive)]
    pub input_len: usize,
    /// Output tokens asked of every request (unless its JSONL line says).
    #[arg(long, default_value_t = 128, value_parser = parse_positive)]
    pub output_len: usize,
    /// Lengths drawn uniformly from [len × (1 − r), len × (1 + r)].
    #[arg(long, default_value_t = 0.0, value_parser = parse_ratio)]
    pub range_ratio: f64,
    /// How a random prompt is sent to /v1/completions (chat always takes text).
    #[arg(long, value_enum, default_value_t = PromptForm::Ids)]
    pub prompt_form: PromptForm,
    /// Random token ids are drawn from [100, this); keep it within the
    /// smallest vocabulary among the servers you compare.
    #[arg(long, default_value_t = 32_000, value_parser = parse_positive)]
    pub vocab_limit: usize,
    /// Seeds the workload and the arrival times: the same seed gives the same requests.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Let generation stop at an end-of-sequence token (by default
    /// `ignore_eos` is sent, so outputs have exactly the asked length on
    /// servers that honour it: inferd, vLLM, llama.cpp).
    #[arg(long)]
    pub stop_at_eos: bool,
    /// Sampling temperature of every request.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,

    /// Closed loop: this many clients, each sending its next request when
    /// the last one ends. A list (1,4,16) is a sweep, one run each.
    #[arg(long, value_delimiter = ',', value_parser = parse_positive, conflicts_with = "request_rate")]
    pub concurrency: Vec<usize>,
    /// Open loop: requests per second arriving at random (see
    /// --burstiness), `inf` for all at once. A list is a sweep.
    #[arg(long, value_delimiter = ',', value_parser = parse_rate)]
    pub request_rate: Vec<f64>,
    /// Shape of the gamma distribution of gaps between arrivals: 1 is
    /// Poisson, below 1 burstier, above 1 more even.
    #[arg(long, default_value_t = 1.0, value_parser = parse_burstiness)]
    pub burstiness: f64,
    /// Open loop: at most this many requests in flight (others wait).
    #[arg(long, value_parser = parse_positive)]
    pub max_concurrency: Option<usize>,
    /// Requests per run; a list gives each run of a sweep its own count.
    #[arg(long, value_delimiter = ',', value_parser = parse_positive, default_value = "64")]
    pub num_prompts: Vec<usize>,
    /// Requests sent before the first run and left out of every figure.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Seconds before one request counts as failed.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,

    /// Goodput: requests per second that met every SLO, e.g. `--goodput
    /// ttft:2000 --goodput tpot:100` (milliseconds).
    #[arg(long, value_name = "METRIC:MS")]
    pub goodput: Vec<Slo>,
    /// A name for these runs in the JSON and the plots.
    #[arg(long)]
    pub label: Option<String>,
    /// Write the runs as JSON Lines: one object per run.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write PNG plots into this folder: throughput against latency across
    /// the runs, and latency distributions.
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
    /// Run nothing: tabulate two earlier --json files side by side (and
    /// with --plot, plot both, a line per --label).
    #[arg(long, num_args = 2, value_names = ["A", "B"], conflicts_with_all = ["concurrency", "request_rate"])]
    pub compare: Option<Vec<PathBuf>>,
}

/// One point of the sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    Concurrency(usize),
    Rate { per_s: f64, burstiness: f64, max_concurrency: Option<usize> },
}

impl ServeBench {
    /// The runs to make, each with its request count.
    pub fn runs(&self) -> Result<Vec<(Load, usize)>, String> {
        let loads: Vec<Load> = if !self.request_rate.is_empty() {
            self.request_rate
                .iter()
                .map(|&per_s| Load::Rate {
                    per_s,
                    burstiness: self.burstiness,
                    max_concurrency: self.max_concurrency,
                })
                .collect()
        } else if !self.concurrency.is_empty() {
            self.concurrency.iter().map(|&c| Load::Concurrency(c)).collect()
        } else {
            vec![Load::Concurrency(1)]
        };
        let counts = &self.num_prompts;
        if counts.len() != 1 && counts.len() != loads.len() {
            return Err(format!(
                "--num-prompts takes one count or one per run ({} runs), got {}",
                loads.len(),
                counts.len()
            ));
        }
        Ok(loads.into_iter().enumerate().map(|(i, l)| (l, counts[i.min(counts.len() - 1)])).collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: ServeBench,
    }

    /// `ServeBench` from flags, as `inferd bench serve` parses them.
    pub(crate) fn parse(flags: &[&str]) -> Result<ServeBench, String> {
        Cli::try_parse_from(["bench"].iter().chain(flags)).map(|c| c.bench).map_err(|e| e.to_string())
    }

    #[test]
    fn a_sweep_is_one_run_per_point_with_its_count() {
        let runs = parse(&["--concurrency", "1,4,16", "--num-prompts", "2,8,32"]).unwrap().runs().unwrap();
        assert_eq!(runs, [(Load::Concurrency(1), 2), (Load::Concurrency(4), 8), (Load::Concurrency(16), 32)]);
        let runs = parse(&["--request-rate", "2,inf", "--burstiness", "0.5"]).unwrap().runs().unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(
            runs[1],
            (Load::Rate { per_s: f64::INFINITY, burstiness: 0.5, max_concurrency: None }, 64)
        );
        assert_eq!(parse(&[]).unwrap().runs().unwrap(), [(Load::Concurrency(1), 64)]);
        let err = parse(&["--concurrency", "1,2,3", "--num-prompts", "1,2"]).unwrap().runs().unwrap_err();
        assert!(err.contains("one per run"), "{err}");
    }

    #[test]
    fn bad_flags_are_refused_with_the_reason() {
        for (flags, want) in [
            (&["--concurrency", "0"][..], "at least 1"),
            (&["--request-rate", "0"], "positive number or inf"),
            (&["--range-ratio", "1.5"], "[0, 1)"),
            (&["--goodput", "ttft"], "METRIC:MS"),
            (&["--concurrency", "2", "--request-rate", "1"], "cannot be used with"),
        ] {
            let err = parse(flags).err().unwrap_or_default();
            assert!(err.contains(want), "{flags:?}: {err}");
        }
    }
}
