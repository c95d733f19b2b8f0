//! `GET /v1/usage`: usage summaries from the ledger; `POST /v1/feedback`:
//! a thumbs up or down on a request the caller's tenant made.

use std::collections::HashMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use inferd_gateway::metrics as m;
use inferd_ledger::{GroupBy, Rating, Summary, SummaryRow};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::clock;
use crate::error::ApiError;
use crate::state::SharedState;
use crate::tenants::Caller;

const MAX_COMMENT_CHARS: usize = 2000;

fn ledger(st: &SharedState) -> Result<std::sync::Arc<inferd_ledger::Ledger>, ApiError> {
    st.ledger.clone().ok_or_else(|| ApiError::Unavailable {
        message: "This server keeps no usage ledger.".into(),
        retry_after_secs: 60,
    })
}

fn row_json(row: &SummaryRow, group_by: &[GroupBy]) -> Value {
    let mut v = json!({
        "requests": row.requests,
        "prompt_tokens": row.prompt_tokens,
        "cached_prompt_tokens": row.cached_prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "total_tokens": row.total_tokens(),
        "cost_usd": row.cost_usd,
        "thumbs_up": row.thumbs_up,
        "thumbs_down": row.thumbs_down,
        "thumbs_up_share": row.thumbs_up_share(),
    });
    for (g, k) in group_by.iter().zip(&row.keys) {
        v[g.as_str()] = json!(k);
    }
    v
}

/// One CSV cell: quoted when it holds a separator or quote, and kept from
/// being read as a spreadsheet formula.
fn csv_cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) { format!("'{s}") } else { s.to_string() };
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s }
}

fn csv(summary: &Summary, group_by: &[GroupBy]) -> String {
    let mut out: Vec<String> = group_by.iter().map(|g| g.as_str().to_string()).collect();
    out.extend(
        [
            "requests",
            "prompt_tokens",
            "cached_prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cost_usd",
            "thumbs_up",
            "thumbs_down",
            "thumbs_up_share",
        ]
        .map(String::from),
    );
    let mut text = out.join(",") + "\n";
    for r in &summary.rows {
        let mut cells: Vec<String> = r.keys.iter().map(|k| csv_cell(k)).collect();
        cells.extend([
            r.requests.to_string(),
            r.prompt_tokens.to_string(),
            r.cached_prompt_tokens.to_string(),
            r.completion_tokens.to_string(),
            r.total_tokens().to_string(),
            format!("{:.6}", r.cost_usd),
            r.thumbs_up.to_string(),
            r.thumbs_down.to_string(),
            r.thumbs_up_share().map(|s| format!("{s:.4}")).unwrap_or_default(),
        ]);
        text.push_str(&cells.join(","));
        text.push('\n');
    }
    text
}

/// How long a rating waits for the ledger.
const FEEDBACK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// 503: the ledger's store cannot be reached (PostgreSQL down).
fn unreachable_ledger(message: String) -> ApiError {
    ApiError::Unavailable { message, retry_after_secs: 10 }
}

/// `GET /v1/usage?start=&end=&group_by=&tenant=&format=`.
pub async fn usage(
    State(st): State<SharedState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (query, as_csv) = inferd_gateway::usage_query::parse_query(&q, &caller)?;
    let ledger = ledger(&st)?;
    let q2 = query.clone();
    let summary = tokio::task::spawn_blocking(move || ledger.summary(&q2))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| match e.is_unavailable() {
            true => unreachable_ledger(format!("The usage ledger cannot be read right now ({e}).")),
            false => ApiError::Internal(e.to_string()),
        })?;
    if as_csv {
        let body = csv(&summary, &query.group_by);
        return Ok(([("content-type", "text/csv; charset=utf-8")], body).into_response());
    }
    let mut totals = SummaryRow::default();
    for r in &summary.rows {
        totals.requests += r.requests;
        totals.prompt_tokens += r.prompt_tokens;
        totals.cached_prompt_tokens += r.cached_prompt_tokens;
        totals.completion_tokens += r.completion_tokens;
        totals.cost_usd += r.cost_usd;
        totals.thumbs_up += r.thumbs_up;
        totals.thumbs_down += r.thumbs_down;
    }
    let data: Vec<Value> = summary.rows.iter().map(|r| row_json(r, &query.group_by)).collect();
    let tenants = st.tenants();
    let quota = query.tenant.as_deref().and_then(|t| tenants.get(t)).map(|t| quota_json(t));
    Ok(Json(json!({
        "quota": quota,
        "object": "usage.summary",
        "start": query.start_ms / 1000,
        "end": query.end_ms / 1000,
        "tenant": query.tenant,
        "group_by": query.group_by.iter().map(|g| g.as_str()).collect::<Vec<_>>(),
        "data": data,
        "totals": row_json(&totals, &[]),
    }))
    .into_response())
}

/// A tenant's quotas: limit and tokens used in the current UTC day and month.
fn quota_json(tenant: &crate::tenants::Tenant) -> Value {
    let cfg = tenant.limiter.config();
    let (day, month) = tenant.limiter.quota_used();
    let entry = |limit: Option<u64>, used: Option<u64>| {
        limit.map(|l| json!({"limit": l, "used": used.unwrap_or(0), "remaining": l.saturating_sub(used.unwrap_or(0))}))
    };
    json!({
        "tokens_per_day": entry(cfg.tokens_per_day, day),
        "tokens_per_month": entry(cfg.tokens_per_month, month),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    request_id: String,
    rating: String,
    comment: Option<String>,
}

/// `POST /v1/feedback {request_id, rating: "up"|"down", comment?}`.
pub async fn feedback(
    State(st): State<SharedState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<FeedbackRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body?;
    let rating = match req.rating.as_str() {
        "up" => Rating::Up,
        "down" => Rating::Down,
        other => {
            return Err(ApiError::invalid(
                format!("rating must be \"up\" or \"down\", got {other:?}"),
                "rating",
            ));
        }
    };
    if req.request_id.is_empty() || req.request_id.len() > 256 {
        return Err(ApiError::invalid("request_id must be 1-256 characters", "request_id"));
    }
    if req.comment.as_ref().is_some_and(|c| c.chars().count() > MAX_COMMENT_CHARS) {
        return Err(ApiError::invalid(
            format!("comment must be at most {MAX_COMMENT_CHARS} characters"),
            "comment",
        ));
    }
    // Comments are free text from users: kept, but never with personal data.
    let comment = req.comment.as_deref().map(crate::redact::redact);
    let ledger = ledger(&st)?;
    let reply = ledger
        .feedback(&caller.tenant.id, &req.request_id, rating, comment, clock::now_unix_ms())
        .map_err(|e| unreachable_ledger(e.to_string()))?;
    let model = ledger
        .wait(reply, FEEDBACK_WAIT)
        .await
        .map_err(|e| {
            unreachable_ledger(format!(
                "The rating is queued but not yet recorded ({e}); it applies once the ledger is back if that request exists, and sending it again is harmless."
            ))
        })?
        .ok_or_else(|| ApiError::UnknownRequest(req.request_id.clone()))?;
    metrics::counter!(m::FEEDBACK_TOTAL, "model" => model, "rating" => rating.as_str()).increment(1);
    Ok(Json(json!({"object": "feedback", "request_id": req.request_id, "rating": rating.as_str()})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_defused() {
        assert_eq!(csv_cell("search"), "search");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("=SUM(A1)"), "'=SUM(A1)");
    }
}
