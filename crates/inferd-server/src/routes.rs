//! The HTTP routes: OpenAI completions and chat completions (streamed or
//! not), models, tokenize and detokenize, health and stats.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use axum::{Extension, Json, Router};
use inferd_core::{FinishReason, SamplingParams};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::generate::{Choice, start_choices};
use crate::meter::{RequestInfo, RequestMeter};
use crate::openai::{ChatRequest, CompletionRequest, DetokenizeRequest, Prompt, TokenizeRequest};
use crate::responses::{Envelope, Route, logprobs_json};
use crate::state::{Phase, Serving, SharedState};
use crate::tenants::Caller;
use crate::tools::ToolSet;

/// One route: its method and path (as the OpenAPI document names them),
/// whether it needs an API key when tenants are configured, and its handler.
pub struct RouteSpec {
    pub method: Method,
    pub path: &'static str,
    pub authenticated: bool,
    /// The handler, mounted for a method.
    mount: Box<dyn FnOnce(MethodFilter) -> MethodRouter<SharedState>>,
}

impl std::fmt::Debug for RouteSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

impl RouteSpec {
    fn method_router(self) -> MethodRouter<SharedState> {
        let filter = MethodFilter::try_from(self.method).expect("routes use standard methods");
        (self.mount)(filter)
    }
}

fn route<H, T>(method: Method, path: &'static str, authenticated: bool, handler: H) -> RouteSpec
where
    H: axum::handler::Handler<T, SharedState>,
    T: 'static,
{
    RouteSpec { method, path, authenticated, mount: Box::new(move |filter| on(filter, handler)) }
}

/// Every route the server answers. The router is built from this table and
/// a test holds it equal to `openapi.json`, so the document cannot drift.
pub fn routes() -> Vec<RouteSpec> {
    vec![
        route(Method::POST, "/v1/completions", true, completions),
        route(Method::POST, "/v1/chat/completions", true, chat_completions),
        route(Method::GET, "/v1/models", true, models),
        route(Method::GET, "/v1/usage", true, crate::usage::usage),
        route(Method::POST, "/v1/feedback", true, crate::usage::feedback),
        route(Method::POST, "/tokenize", true, tokenize),
        route(Method::POST, "/detokenize", true, detokenize),
        // For operators and load balancers: never behind a key.
        route(Method::GET, "/health", false, health),
        route(Method::GET, "/ready", false, ready),
        route(Method::GET, "/metrics", false, metrics_text),
        route(Method::GET, "/stats", false, stats),
        route(Method::GET, "/stats/recent", false, stats_recent),
        route(Method::GET, "/openapi.json", false, openapi),
    ]
}

/// The OpenAPI 3.1 document of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// `GET /openapi.json`: the document, with this instance's model name as
/// the one value `model` may take.
async fn openapi(State(st): State<SharedState>) -> Response {
    static DOC: std::sync::LazyLock<Value> =
        std::sync::LazyLock::new(|| serde_json::from_str(OPENAPI).expect("openapi.json is JSON"));
    let mut doc = DOC.clone();
    if !st.models.is_empty() {
        let names: Vec<&str> = st.models.iter().map(|m| &*m.name).collect();
        doc["components"]["schemas"]["ModelName"]["enum"] = json!(names);
    }
    Json(doc).into_response()
}

pub fn router(state: SharedState, limits: crate::conn::ConnLimits) -> Router {
    let (mut api, mut open) = (Router::new(), Router::new());
    for r in routes() {
        if r.authenticated {
            api = api.route(r.path, r.method_router());
        } else {
            open = open.route(r.path, r.method_router());
        }
    }
    // API routes need a key when tenants are configured.
    let api = api.route_layer(axum::middleware::from_fn_with_state(state.clone(), crate::auth::authenticate));
    if state.console {
        open = open.merge(crate::console::router());
    }
    Router::new()
        .merge(api)
        .merge(open)
        .fallback(|| async { ApiError::NotFound })
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::drain::gate))
        .layer(axum::middleware::from_fn(crate::request_id::request_id))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(limits, crate::conn::read_body))
        .layer(axum::middleware::from_fn(crate::conn::catch_panic))
        .with_state(state)
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Runs `f` on the blocking pool: tokenization and templating stay off
/// the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(e.to_string()))?
}

fn check_tokens(serving: &Serving, ids: &[u32]) -> Result<(), ApiError> {
    match ids.iter().find(|&&t| t as usize >= serving.vocab_size) {
        Some(t) => Err(ApiError::invalid(
            format!("token id {t} is outside the vocabulary of {}", serving.vocab_size),
            "prompt",
        )),
        None => Ok(()),
    }
}

async fn completions(
    State(st): State<SharedState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let Json(req) = body?;
    let serving = st.serving_for(req.model.as_deref(), &caller)?;
    let kept_prompt = caller.tenant.log_prompts.then(|| match &req.prompt {
        Prompt::Text(s) => s.clone(),
        Prompt::Texts(v) => serde_json::to_string(v).unwrap_or_default(),
        Prompt::Tokens(t) => serde_json::to_string(t).unwrap_or_default(),
        Prompt::TokenLists(t) => serde_json::to_string(t).unwrap_or_default(),
    });
    let ctx = RequestCtx::new(caller, &headers, &req.sampling, kept_prompt, arrival)?;
    if req.echo {
        return Err(ApiError::invalid("echo is not supported", "echo"));
    }
    // Before tokenizing: a list of prompts is bounded by the waiting queue.
    st.admission.check_fits(req.sequences(), 0)?;
    let tokenizer = serving.tokenizer.clone();
    let prompt = req.prompt.clone();
    let prompts = blocking(move || {
        let encode = |s: &str| tokenizer.encode(s).map_err(|e| ApiError::invalid(e.to_string(), "prompt"));
        match prompt {
            Prompt::Text(s) => Ok(vec![encode(&s)?]),
            Prompt::Texts(v) => v.iter().map(|s| encode(s)).collect(),
            Prompt::Tokens(t) => Ok(vec![t]),
            Prompt::TokenLists(v) => Ok(v),
        }
    })
    .await?;
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::invalid("prompt must not be empty", "prompt"));
    }
    for p in &prompts {
        check_tokens(serving, p)?;
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let params = req.params(longest, serving.max_model_len)?;
    let output = Output { spec: crate::structured::spec(&req.sampling)?, tools: None };
    run(&st, serving, Route::Completions, prompts, params, &req.sampling, ctx, output).await
}

async fn chat_completions(
    State(st): State<SharedState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let Json(req) = body?;
    let serving = st.serving_for(req.model.as_deref(), &caller)?;
    let name = serving.model_name.clone();
    let kept_prompt = if caller.tenant.log_prompts {
        let lines: Result<Vec<String>, ApiError> = req
            .messages
            .iter()
            .map(|m| Ok(format!("{}: {}", m.role, crate::chat::message_text(m)?)))
            .collect();
        Some(lines?.join("\n"))
    } else {
        None
    };
    let ctx = RequestCtx::new(caller, &headers, &req.sampling, kept_prompt, arrival)?;
    // Refuse bad parameters before rendering and tokenizing.
    req.params(0, usize::MAX)?;
    let tools = ToolSet::parse(req.tools.as_deref(), req.tool_choice.as_ref(), req.parallel_tool_calls)?;
    let mut spec = crate::structured::spec(&req.sampling)?;
    if let Some(grammar) = tools.as_ref().and_then(ToolSet::grammar) {
        if spec.is_some() {
            return Err(ApiError::invalid(
                "a required or named tool_choice already fixes the output; drop response_format and guided_*",
                "tool_choice",
            ));
        }
        if req.sampling.ignore_eos {
            return Err(ApiError::invalid(
                "ignore_eos cannot be combined with a required tool call",
                "ignore_eos",
            ));
        }
        spec = Some((grammar, "tool_choice"));
    }
    let tools = tools.filter(ToolSet::active).map(Arc::new);
    let st2 = st.clone();
    let messages = req.messages.clone();
    let shown = tools.clone();
    let prompt = blocking(move || {
        let serving = st2.loaded_named(&name)?;
        let text = crate::chat::render(serving, &messages, true, shown.as_deref())?;
        serving.tokenizer.encode(&text).map_err(|e| ApiError::invalid(e.to_string(), "messages"))
    })
    .await?;
    let params = req.params(prompt.len(), serving.max_model_len)?;
    run(&st, serving, Route::Chat, vec![prompt], params, &req.sampling, ctx, Output { spec, tools }).await
}

/// Who asked, and what the usage record needs besides token counts.
struct RequestCtx {
    caller: Caller,
    request_id: String,
    feature: Option<String>,
    /// The prompt, only for tenants that keep prompts (redacted later).
    kept_prompt: Option<String>,
    arrival: Instant,
    /// Test fault: panic in the streaming task (debug builds only).
    panic_in_stream: bool,
}

impl RequestCtx {
    fn new(
        caller: Caller,
        headers: &HeaderMap,
        fields: &crate::openai::SamplingFields,
        kept_prompt: Option<String>,
        arrival: Instant,
    ) -> Result<Self, ApiError> {
        let feature = feature_tag(headers, fields)?;
        let request_id = headers
            .get(crate::request_id::HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let fault = crate::conn::fault::requested(headers);
        assert!(fault != Some("panic-handler"), "injected fault: a panic in the handler");
        if let Some(unix) = fault.and_then(|f| f.strip_prefix("clock=")).and_then(|t| t.parse().ok()) {
            crate::clock::set_fault_now(unix);
        }
        let panic_in_stream = fault == Some("panic-stream");
        Ok(RequestCtx { caller, request_id, feature, kept_prompt, arrival, panic_in_stream })
    }
}

/// Longest feature tag accepted.
const MAX_FEATURE_LEN: usize = 64;

/// The usage feature tag: `X-Inferd-Feature`, else `metadata.feature`, else `user`.
fn feature_tag(
    headers: &HeaderMap,
    fields: &crate::openai::SamplingFields,
) -> Result<Option<String>, ApiError> {
    let from_header = match headers.get("x-inferd-feature") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::invalid("X-Inferd-Feature must be visible ASCII", None))?
                .to_string(),
        ),
        None => None,
    };
    let from_metadata = fields.metadata.as_ref().and_then(|m| m.get("feature")).and_then(|v| v.as_str());
    let tag = from_header.or_else(|| from_metadata.map(String::from)).or_else(|| fields.user.clone());
    match tag {
        Some(t) if t.chars().count() > MAX_FEATURE_LEN || t.chars().any(char::is_control) => {
            Err(ApiError::invalid(
                format!(
                    "the feature tag must be at most {MAX_FEATURE_LEN} characters with no control characters"
                ),
                None,
            ))
        }
        Some(t) if t.is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// The engine's busy time, which prices tokens in the meter.
#[derive(Debug)]
struct EngineBusy(inferd_engine::EngineHandle);

impl inferd_gateway::meter::BusyTime for EngineBusy {
    fn busy_micros(&self) -> u64 {
        self.0.stats().busy_micros.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn busy_micros(engine: &inferd_engine::EngineHandle) -> std::sync::Arc<dyn inferd_gateway::meter::BusyTime> {
    std::sync::Arc::new(EngineBusy(engine.clone()))
}

/// Starts the choices and answers in one body or as a stream.
/// What a request's output must be: a grammar to hold it to, and the tools
/// whose calls are read from it.
struct Output {
    /// The grammar, and the request field it came from.
    spec: Option<(inferd_grammar::Spec, &'static str)>,
    tools: Option<Arc<ToolSet>>,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    st: &crate::state::AppState,
    serving: &Serving,
    route: Route,
    prompts: Vec<Vec<u32>>,
    params: SamplingParams,
    fields: &crate::openai::SamplingFields,
    ctx: RequestCtx,
    output: Output,
) -> Result<Response, ApiError> {
    if let Some(&(t, _)) = params.logit_bias.iter().find(|(t, _)| *t as usize >= serving.vocab_size) {
        return Err(ApiError::invalid(
            format!("logit_bias names token {t}, outside the vocabulary of {}", serving.vocab_size),
            "logit_bias",
        ));
    }
    serving.check_backend()?;
    st.check_ledger()?;
    // Each choice's grammar state, compiled (or taken from the cache) off
    // the async runtime before anything is queued.
    let constraints = match output.spec {
        Some((spec, param)) => {
            let grammars = serving.grammars.clone().map_err(|why| {
                ApiError::invalid(
                    format!("structured output is unavailable for this model: {why}"),
                    "response_format",
                )
            })?;
            if serving.engine.capabilities().samples_on_device() {
                return Err(ApiError::invalid(
                    "structured output needs the engine's sampler, and this backend samples on its device",
                    param,
                ));
            }
            let count = prompts.len() * params.n as usize;
            blocking(move || {
                (0..count)
                    .map(|_| {
                        grammars
                            .constraint(&spec)
                            .map(Some)
                            .map_err(|e| ApiError::invalid(e.to_string(), param))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?
        }
        None => Vec::new(),
    };
    crate::validate::check_device_sampling(&params, serving.engine.capabilities().device_sampling)?;
    for p in &prompts {
        crate::validate::check_compiled_prompt(p.len(), serving.max_prompt_tokens)?;
        let need = p.len() + params.max_tokens as usize;
        if need > serving.kv_capacity_tokens {
            return Err(ApiError::invalid(
                format!(
                    "This request needs {need} tokens of KV cache ({} prompt + {} max_tokens), but the whole cache holds {} tokens.",
                    p.len(),
                    params.max_tokens,
                    serving.kv_capacity_tokens
                ),
                "max_tokens",
            ));
        }
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    st.admission.check_fits(prompts.len() * params.n as usize, longest + params.max_tokens as usize)?;
    let timeout = crate::validate::request_timeout(fields.timeout, st.request_timeout)?;
    // The tenant's limits: the most this request can use is every prompt
    // once plus max_tokens for every choice.
    let charge = prompts.iter().map(|p| p.len() as u64).sum::<u64>()
        + prompts.len() as u64 * u64::from(params.n) * u64::from(params.max_tokens);
    let tenant = &ctx.caller.tenant;
    let ticket =
        tenant.limiter.admit_shared(charge).await.map_err(|r| ApiError::from_refusal(&tenant.id, r))?;
    let prefix = if route == Route::Chat { "chatcmpl" } else { "cmpl" };
    let panic_in_stream = ctx.panic_in_stream;
    let envelope = Envelope {
        id: format!("{prefix}-{}", crate::request_id::generate()),
        created: now_secs(),
        model: serving.model_name.to_string(),
        route,
        tools: output.tools,
    };
    let info = RequestInfo {
        caller: ctx.caller,
        request_id: ctx.request_id,
        response_id: envelope.id.clone(),
        model: serving.model_name.to_string(),
        feature: ctx.feature,
        route: if envelope.route == Route::Chat { "chat" } else { "completions" },
        prompt_text: ctx.kept_prompt.map(|p| crate::redact::redact(&p)),
    };
    let meter = RequestMeter::new(
        info,
        ctx.arrival,
        ticket,
        st.ledger.clone(),
        serving.cost.clone(),
        busy_micros(&serving.engine),
        st.live_meters.clone(),
    );
    let choices = start_choices(st, serving, prompts, &params, timeout, &meter, constraints)?;
    let tokenizer = serving.tokenizer.clone();
    if fields.stream {
        let include_usage = fields.stream_options.is_some_and(|o| o.include_usage);
        Ok(crate::sse::stream(
            envelope,
            choices,
            tokenizer,
            include_usage,
            st.sse_keepalive,
            meter,
            panic_in_stream,
        )
        .into_response())
    } else {
        let results = futures_util::future::join_all(choices.into_iter().map(collect)).await;
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            let (choice, text, lps) = r?;
            let logprobs = params.logprobs.map(|_| logprobs_json(envelope.route, &tokenizer, &lps, 0));
            let finish = choice.finish_reason.unwrap_or(FinishReason::Abort).as_str();
            out.push(envelope.choice(choice.index, &text, logprobs, finish));
        }
        // On disk before the client has its answer.
        let usage = meter.finish().await;
        Ok(Json(envelope.response(out, usage)).into_response())
    }
}

type Collected = (Choice, String, Vec<(u32, inferd_core::TokenLogprobs)>);

async fn collect(mut choice: Choice) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut lps = Vec::new();
    while let Some(piece) = choice.next().await {
        let piece = piece?;
        text.push_str(&piece.text);
        lps.extend(piece.logprobs);
    }
    Ok((choice, text, lps))
}

async fn models(
    State(st): State<SharedState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let data: Vec<Value> = st
        .models
        .iter()
        .filter(|m| caller.tenant.may_use(&m.name))
        .filter_map(|m| m.serving.get())
        .map(|serving| {
            json!({
                "id": &*serving.model_name,
                "object": "model",
                "created": 0,
                "owned_by": "inferd",
                "max_model_len": serving.max_model_len,
            })
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn tokenize(
    State(st): State<SharedState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<TokenizeRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body?;
    let model = match &req {
        TokenizeRequest::Chat { model, .. } | TokenizeRequest::Prompt { model, .. } => model.clone(),
    };
    let serving = st.serving_for(model.as_deref(), &caller)?;
    let name = serving.model_name.clone();
    let st2 = st.clone();
    let tokens = blocking(move || {
        let serving = st2.loaded_named(&name)?;
        let text = match req {
            TokenizeRequest::Chat { messages, add_generation_prompt, .. } => {
                crate::chat::render(serving, &messages, add_generation_prompt, None)?
            }
            TokenizeRequest::Prompt { prompt, .. } => prompt,
        };
        serving.tokenizer.encode(&text).map_err(|e| ApiError::invalid(e.to_string(), "prompt"))
    })
    .await?;
    Ok(Json(json!({"tokens": tokens, "count": tokens.len(), "max_model_len": serving.max_model_len})))
}

async fn detokenize(
    State(st): State<SharedState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<DetokenizeRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body?;
    let serving = st.serving_for(req.model.as_deref(), &caller)?;
    let ids: Vec<u32> = req
        .tokens
        .iter()
        .map(|&t| u32::try_from(t).ok().filter(|&t| (t as usize) < serving.vocab_size))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            ApiError::invalid(format!("tokens must be ids in [0, {})", serving.vocab_size), "tokens")
        })?;
    let text =
        serving.tokenizer.decode(&ids, false).map_err(|e| ApiError::invalid(e.to_string(), "tokens"))?;
    Ok(Json(json!({ "prompt": text })))
}

/// Liveness: the process can serve or heal itself. A backend restarting
/// its worker is alive (readiness says it is not ready meanwhile).
async fn health(State(st): State<SharedState>) -> Response {
    match st.engine_problem().filter(|&p| p != "backend_restarting") {
        None => Json(json!({"status": "ok"})).into_response(),
        Some(problem) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": problem}))).into_response(),
    }
}

/// Readiness for the load balancer: cheap, never waits on the engine.
async fn ready(State(st): State<SharedState>) -> Response {
    let ledger_full = st.ledger.as_ref().is_some_and(|l| l.backlog_full());
    let status = match (st.phase(), st.engine_problem()) {
        (Phase::Loading, _) => "loading",
        (Phase::Draining, _) => "draining",
        (Phase::Ready, Some(problem)) => problem,
        (Phase::Ready, None) if ledger_full => "ledger_backlog_full",
        (Phase::Ready, None) => "ready",
    };
    let r = std::sync::atomic::Ordering::Relaxed;
    let mut body = json!({"status": status, "uptime_seconds": st.started.elapsed().as_secs()});
    let mut models = Vec::new();
    for slot in &st.models {
        let mut m = json!({"name": &*slot.name, "status": slot.status()});
        match (slot.serving.get(), slot.failed.get()) {
            (Some(serving), _) => {
                let s = serving.engine.stats();
                let total = s.kv_blocks_total.load(r);
                m["running"] = json!(s.num_running.load(r));
                m["waiting"] = json!(s.num_waiting.load(r));
                m["kv_cache_usage"] =
                    json!(if total == 0 { 0.0 } else { s.kv_blocks_used() as f64 / total as f64 });
                m["backend"] = crate::state::backend_json(&s.backend());
            }
            (None, Some(why)) => m["reason"] = json!(why),
            (None, None) => m["progress"] = json!(slot.progress.snapshot()),
        }
        models.push(m);
    }
    // The first model's figures at the top, as with one model.
    if let Some(first) = models.iter().find(|m| m["status"] == "ready") {
        body["model"] = first["name"].clone();
        for key in ["running", "waiting", "kv_cache_usage", "backend"] {
            body[key] = first[key].clone();
        }
    }
    if let Some(loading) = models.iter().find(|m| m["status"] == "loading") {
        body["progress"] = loading["progress"].clone();
    }
    body["models"] = json!(models);
    if let Some(ledger) = &st.ledger {
        let failing = ledger.stats().failing.load(r);
        body["ledger"] = json!(if failing { "failing" } else { "ok" });
        body["ledger_pending"] = json!(ledger.stats().pending.load(r));
    }
    let code = if status == "ready" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body)).into_response()
}

async fn metrics_text(State(st): State<SharedState>) -> Response {
    match &st.metrics {
        Some(handle) => {
            let text = crate::telemetry::render(
                handle,
                &st.loaded().map(|s| (&*s.model_name, s.engine.stats())).collect::<Vec<_>>(),
                st.ledger.as_deref().map(|l| l.stats()),
            );
            ([("content-type", "text/plain; version=0.0.4")], text).into_response()
        }
        None => ApiError::Unavailable {
            message: "This process has no metrics recorder installed.".into(),
            retry_after_secs: 60,
        }
        .into_response(),
    }
}

/// One model's engine, for /stats.
fn engine_json(serving: &Serving) -> Value {
    let s = serving.engine.stats();
    let caps = serving.engine.capabilities();
    let r = std::sync::atomic::Ordering::Relaxed;
    json!({
        "backend": {
            "device": caps.device.to_string(),
            "compute_dtype": caps.compute_dtype.as_str(),
            "kv_cache_dtype": caps.kv_dtype.as_str(),
            "block_size": caps.block_size,
            "samples_on_device": caps.samples_on_device(),
            "device_sampling": caps.device_sampling,
            "shape_buckets": caps.shape_buckets,
            "health": crate::state::backend_json(&s.backend()),
        },
        "num_requests_running": s.num_running.load(r),
        "num_requests_waiting": s.num_waiting.load(r),
        "kv_blocks_total": s.kv_blocks_total.load(r),
        "kv_blocks_free": s.kv_blocks_free.load(r),
        "kv_blocks_used": s.kv_blocks_used(),
        "num_preemptions": s.num_preemptions.load(r),
        "num_prefill_capped_steps": s.num_capped_steps.load(r),
        "prefix_cache_query_tokens": s.prefix_query_tokens.load(r),
        "prefix_cache_hit_tokens": s.prefix_hit_tokens.load(r),
        "engine_steps": s.steps.load(r),
        "engine_step_micros": s.busy_micros.load(r),
        "engine_between_steps_micros": s.between_steps_micros.load(r),
        "generated_tokens": s.generated_tokens.load(r),
        "open_choices": serving.open_choices.load(r),
        "cost_per_million_tokens": serving.cost.per_million(s.busy_micros.load(r)),
    })
}

/// The engines' state: every count summed over the models, the first
/// model's backend, and each model's own under `models`.
async fn stats(State(st): State<SharedState>) -> Result<Json<Value>, ApiError> {
    let engines: Vec<(String, Value)> =
        st.loaded().map(|s| (s.model_name.to_string(), engine_json(s))).collect();
    let Some((_, first)) = engines.first() else {
        return Err(ApiError::Unavailable {
            message: "The model is still loading.".into(),
            retry_after_secs: 5,
        });
    };
    let mut body = first.clone();
    for (key, value) in body.as_object_mut().into_iter().flatten() {
        if value.is_u64() {
            *value = json!(engines.iter().filter_map(|(_, e)| e[key.as_str()].as_u64()).sum::<u64>());
        }
    }
    // What a client disconnect must give back: requests whose usage record
    // is not yet queued, choices a client still waits on (above), and the
    // async tasks alive in the runtime.
    let r = std::sync::atomic::Ordering::Relaxed;
    body["open_requests"] = json!(st.live_meters.load(r));
    body["runtime_alive_tasks"] = json!(tokio::runtime::Handle::current().metrics().num_alive_tasks());
    body["api_key_required"] = json!(!st.tenants().is_open());
    body["models"] = Value::Object(engines.into_iter().collect());
    Ok(Json(body))
}

/// The last minutes of serving in time slots: latency percentiles, output
/// tokens, finished and refused requests (what the console charts).
async fn stats_recent() -> Json<Value> {
    Json(crate::recent::recent().json())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tower::ServiceExt;

    use super::*;

    fn documented() -> BTreeSet<(String, String)> {
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("a path item").keys() {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
        out
    }

    #[test]
    fn the_openapi_document_names_exactly_the_routes() {
        let served: BTreeSet<(String, String)> =
            routes().iter().map(|r| (r.method.to_string(), r.path.to_string())).collect();
        assert_eq!(served, documented());
    }

    #[test]
    fn every_documented_error_response_is_an_openai_error() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        for (name, resp) in doc["components"]["responses"].as_object().unwrap() {
            assert_eq!(
                resp["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/Error",
                "{name}"
            );
        }
    }

    fn limits() -> crate::conn::ConnLimits {
        crate::conn::ConnLimits {
            header_read_timeout: std::time::Duration::from_secs(5),
            body_read_timeout: std::time::Duration::from_secs(5),
            max_header_bytes: 1 << 16,
            max_body_bytes: 1 << 20,
        }
    }

    #[tokio::test]
    async fn the_router_answers_every_route_of_the_table() {
        let app = router(std::sync::Arc::new(crate::state::AppState::default()), limits());
        for r in routes() {
            let req = axum::http::Request::builder()
                .method(r.method.clone())
                .uri(r.path)
                .header("content-type", "application/json")
                .body(axum::body::Body::from("{}"))
                .unwrap();
            let resp = app.clone().oneshot(req).await.unwrap();
            // Without a model the answer may be 503 or 400; never "no such route".
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
            let text = String::from_utf8_lossy(&body);
            assert!(status != StatusCode::METHOD_NOT_ALLOWED, "{} {}: {status}", r.method, r.path);
            assert!(!text.contains("Unknown route."), "{} {}: {text}", r.method, r.path);
        }
        let req = axum::http::Request::get("/v1/nothing").body(axum::body::Body::empty()).unwrap();
        assert_eq!(app.oneshot(req).await.unwrap().status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn the_console_is_served_unless_turned_off() {
        for console in [true, false] {
            let state = crate::state::AppState { console, ..Default::default() };
            let app = router(std::sync::Arc::new(state), limits());
            for path in ["/", "/console/console.js"] {
                let req = axum::http::Request::get(path).body(axum::body::Body::empty()).unwrap();
                let resp = app.clone().oneshot(req).await.unwrap();
                let want = if console { StatusCode::OK } else { StatusCode::NOT_FOUND };
                assert_eq!(resp.status(), want, "{path} with console {console}");
            }
        }
    }
}
