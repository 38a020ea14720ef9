//! The HTTP side: routes, the request's checks and the JSON both ways. Every refusal is a 4xx
//! with `{"error": "…"}` naming the field (400: malformed or out of range; 413: too large;
//! 404 / 405: no such route or method; 503: the queue is full or the server is stopping).

use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_families::infer::RunModel;
use kiln_families::BeamSettings;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::batcher::Job;
use crate::Counters;

/// Bounds on what one request may ask.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes of a request body.
    pub max_body: usize,
    /// Sentences of one request.
    pub max_sentences: usize,
    /// Characters of one sentence (checked before tokenizing; the model's own limit in tokens,
    /// `data.max_len`, is checked after).
    pub max_chars: usize,
    /// Sentences queued for decoding at once, all requests together (past it: 503).
    pub max_queued: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_body: 1 << 20, max_sentences: 256, max_chars: 4096, max_queued: 16_384 }
    }
}

/// `POST /translate`'s body.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TranslateRequest {
    pub src: Vec<String>,
    /// Beam width (1 = greedy, batched), as `kiln translate --beam`.
    #[serde(default = "one")]
    pub beam: usize,
    /// Translations per sentence, best first (at most `beam`).
    #[serde(default = "one")]
    pub n_best: usize,
    /// GNMT length penalty α, as `kiln translate --len-penalty`.
    #[serde(default = "alpha")]
    pub len_penalty: f64,
    /// Echoed in the answer, so a client can match answers to requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

fn one() -> usize {
    1
}

fn alpha() -> f64 {
    1.0
}

/// One translation and its score (log-probability with `</s>` over the length penalty).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hypothesis {
    pub text: String,
    pub score: f64,
}

/// A sentence's answer: its best translation and, where `n_best` > 1, the n best.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Translation {
    pub text: String,
    pub score: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_best: Option<Vec<Hypothesis>>,
}

/// `POST /translate`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TranslateResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    pub translations: Vec<Translation>,
}

pub(crate) struct Server {
    pub run: Arc<RunModel>,
    pub jobs: Sender<Job>,
    pub counters: Arc<Counters>,
    pub limits: Limits,
    pub device: String,
}

pub(crate) fn router(server: Server) -> Router {
    Router::new()
        .route("/translate", post(translate))
        .route("/health", get(health))
        .route("/model", get(model))
        .fallback(|| async { refuse(StatusCode::NOT_FOUND, "no such route; the routes are POST /translate, GET /health, GET /model") })
        .method_not_allowed_fallback(|| async { refuse(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here; POST /translate, GET /health, GET /model") })
        .with_state(Arc::new(server))
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn health(State(s): State<Arc<Server>>) -> Response {
    let c = &s.counters;
    Json(json!({
        "status": "ok",
        "requests": c.requests.load(Ordering::Relaxed),
        "sentences": c.sentences.load(Ordering::Relaxed),
        "batches": c.batches.load(Ordering::Relaxed),
        "queued": c.queued.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn model(State(s): State<Arc<Server>>) -> Response {
    let run = &s.run;
    Json(json!({
        "recipe": run.recipe.name,
        "run_dir": run.run_dir.display().to_string(),
        "checkpoint": run.checkpoint.file_name().map(|n| n.to_string_lossy().into_owned()),
        "step": run.step,
        "weights": if run.decodes_moving_average() { "ema" } else { "model" },
        "architecture": run.recipe.model,
        "vocab_size": run.tokenizer.vocab_size(),
        "max_tokens": run.recipe.data.max_len,
        "device": s.device,
    }))
    .into_response()
}

async fn translate(State(s): State<Arc<Server>>, headers: HeaderMap, body: Body) -> Response {
    let limit = s.limits.max_body;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, &format!("body: {} bytes; at most {limit}", declared.unwrap_or(0)));
    }
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) if format!("{e:#}").contains("length limit") => return refuse(StatusCode::PAYLOAD_TOO_LARGE, &format!("body: more than {limit} bytes")),
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("body: cannot read it: {e}")),
    };
    let mut json = serde_json::Deserializer::from_slice(&bytes);
    let request: TranslateRequest = match serde_path_to_error::deserialize(&mut json) {
        Ok(r) => r,
        Err(e) => {
            let at = e.path().to_string();
            let at = if at == "." { "body".to_string() } else { at };
            return refuse(StatusCode::BAD_REQUEST, &format!("{at}: {}; a request reads {{\"src\": [\"…\"], \"beam\": 1, \"n_best\": 1, \"len_penalty\": 1.0}}", e.inner()));
        }
    };
    if let Err(e) = json.end() {
        return refuse(StatusCode::BAD_REQUEST, &format!("body: {e} after the request's JSON"));
    }
    let tokens = match check(&request, &s.run, &s.limits) {
        Ok(t) => t,
        Err((status, why)) => return refuse(status, &why),
    };
    let n = request.src.len();
    if s.counters.queued.fetch_add(n, Ordering::Relaxed) + n > s.limits.max_queued {
        s.counters.queued.fetch_sub(n, Ordering::Relaxed);
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "busy: too many sentences queued; try again shortly");
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    let beam = BeamSettings { beam: request.beam, max_len: 0, len_penalty: request.len_penalty };
    let job = Job { lines: request.src, tokens, beam, n_best: request.n_best, reply };
    if s.jobs.send(job).is_err() {
        s.counters.queued.fetch_sub(n, Ordering::Relaxed);
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping");
    }
    match answer.await {
        Ok(Ok(hyps)) => {
            s.counters.requests.fetch_add(1, Ordering::Relaxed);
            s.counters.sentences.fetch_add(n as u64, Ordering::Relaxed);
            let translations: Vec<Translation> = hyps
                .into_iter()
                .map(|h| {
                    let best = h.first().cloned().unwrap_or_default();
                    let n_best = (request.n_best > 1).then(|| h.into_iter().map(|(text, score)| Hypothesis { text, score }).collect());
                    Translation { text: best.0, score: best.1, n_best }
                })
                .collect();
            Json(TranslateResponse { id: request.id, translations }).into_response()
        }
        Ok(Err(why)) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &format!("decoding failed: {why}")),
        Err(_) => refuse(StatusCode::INTERNAL_SERVER_ERROR, "the decoding thread ended"),
    }
}

/// The request's bounds and ranges; its source tokens (the batch budget counts them).
fn check(r: &TranslateRequest, run: &RunModel, limits: &Limits) -> Result<usize, (StatusCode, String)> {
    let bad = |m: String| Err((StatusCode::BAD_REQUEST, m));
    let large = |m: String| Err((StatusCode::PAYLOAD_TOO_LARGE, m));
    if r.src.is_empty() {
        return bad("src: expected at least one sentence".into());
    }
    if r.src.len() > limits.max_sentences {
        return large(format!("src: {} sentences; at most {} per request", r.src.len(), limits.max_sentences));
    }
    if let Some((i, s)) = r.src.iter().enumerate().find(|(_, s)| s.chars().count() > limits.max_chars) {
        return large(format!("src[{i}]: {} characters; at most {}", s.chars().count(), limits.max_chars));
    }
    let vocab = run.tokenizer.vocab_size();
    if r.beam == 0 || r.beam > vocab {
        return bad(format!("beam: expected an integer in [1, {vocab}] (the model's vocabulary), got {}", r.beam));
    }
    if r.n_best == 0 || r.n_best > r.beam {
        return bad(format!("n_best: expected an integer in [1, {}] (at most beam), got {}", r.beam, r.n_best));
    }
    if !(r.len_penalty.is_finite() && r.len_penalty >= 0.0) {
        return bad(format!("len_penalty: expected a number >= 0, got {}", r.len_penalty));
    }
    let refs: Vec<&str> = r.src.iter().map(String::as_str).collect();
    let ids = run.tokenizer.encode_batch(&refs).map_err(|e| (StatusCode::BAD_REQUEST, format!("src: cannot tokenize: {e}")))?;
    let most = run.recipe.data.max_len;
    if let Some((i, t)) = ids.iter().enumerate().find(|(_, t)| t.len() > most) {
        return large(format!("src[{i}]: {} tokens; this model translates at most {most} (its data.max_len)", t.len()));
    }
    Ok(ids.iter().map(|t| t.len() + 1).sum())
}
