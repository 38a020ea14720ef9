//! `kiln serve`: a trained translation run behind HTTP, loaded once.
//!
//! - `POST /translate` `{"src": ["…", …], "beam": K, "n_best": M, "len_penalty": a, "id": …}`
//!   → `{"id": …, "translations": [{"text", "score", "n_best"?}, …]}` in input order: the same
//!   translations and scores as `kiln translate [--n-best M]` on the same lines, beam and
//!   checkpoint.
//! - `GET /health` → `{"status": "ok", …counters}`; `GET /model` → the run, checkpoint,
//!   architecture, vocabulary and device.
//!
//! One decoding thread owns the model on the run's device ([`batcher`]); HTTP handlers (axum on
//! a small tokio runtime) check and tokenize requests and queue them there. Requests that arrive
//! within `batch_wait` of each other are decoded together, length-sorted into batches as
//! `translate` does, up to `batch_tokens` source tokens. Bad requests get a 4xx JSON
//! `{"error": "…"}` naming the field, and nothing a client sends (or fails to send) takes the
//! server down. SIGTERM or SIGINT stops accepting, answers what is in flight and exits 0.

pub mod api;
mod batcher;
pub mod client;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use kiln_families::infer::RunModel;

pub use api::{Limits, TranslateRequest};

/// How the server listens and batches.
#[derive(Debug, Clone)]
pub struct Options {
    pub host: String,
    /// 0: any free port (the listening line says which).
    pub port: u16,
    /// How long the decoding thread waits for more requests to join a batch (0: each request
    /// decodes alone, as it comes).
    pub batch_wait: Duration,
    /// Source tokens a merged batch holds at most (it may exceed it by one request).
    pub batch_tokens: usize,
    pub limits: Limits,
}

impl Default for Options {
    fn default() -> Self {
        Self { host: "127.0.0.1".into(), port: 8080, batch_wait: Duration::from_millis(5), batch_tokens: 4096, limits: Limits::default() }
    }
}

/// What the server did, for its closing line and the load test.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub sentences: AtomicU64,
    /// Merged batches the decoding thread ran (each one or more requests).
    pub batches: AtomicU64,
    /// Sentences queued and not yet answered.
    pub queued: AtomicUsize,
}

/// Serves `run` until SIGTERM or SIGINT; `listening` is told the bound address once the model
/// is loaded and requests are accepted.
pub fn serve(run: RunModel, options: Options, listening: impl FnOnce(SocketAddr)) -> Result<Arc<Counters>> {
    let listener = std::net::TcpListener::bind((options.host.as_str(), options.port)).map_err(|e| anyhow!("--host/--port: cannot listen on {}:{}: {e}", options.host, options.port))?;
    listener.set_nonblocking(true).context("listener")?;
    let address = listener.local_addr().context("listener")?;
    let run = Arc::new(run);
    let counters = Arc::new(Counters::default());
    let (jobs, decoder) = batcher::start(run.clone(), options.batch_wait, options.batch_tokens, counters.clone())?;
    let server = api::Server { run, jobs, counters: counters.clone(), limits: options.limits.clone(), device: decoder.device.clone() };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("tokio runtime")?;
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        listening(address);
        axum::serve(listener, api::router(server)).with_graceful_shutdown(stop_signal()).await
    });
    // The router and its job sender are gone: the decoding thread ends after the last job.
    drop(runtime);
    decoder.join()?;
    served.context("serving")?;
    Ok(counters)
}

/// SIGTERM or SIGINT.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
