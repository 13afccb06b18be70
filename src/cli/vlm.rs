//! The vision-language model on the command line: [`VlmArgs`], the `--vlm*` flags that `train`,
//! `repl`, `check` and `eval` share (the only way to open the network to a reward script), and
//! `ddpo vlm-server`, the loopback test server answering from the shapes world.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::reward::vlm::server::{Fault, Faults, Server, MODEL};
use crate::reward::vlm::VlmConfig;

fn defaults() -> VlmConfig {
    VlmConfig::default()
}

/// The `--vlm*` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct VlmArgs {
    /// Base URL of an OpenAI-compatible vision-language model server (vLLM, SGLang, llama.cpp,
    /// Ollama), with or without /v1, e.g. http://localhost:8000: the only endpoint the scripts'
    /// `vlm_ask` / `vlm_score` reach. Saved in the run config.
    #[arg(long, value_name = "URL")]
    pub vlm: Option<String>,
    /// Model name sent with each request (default: the first model the server lists).
    #[arg(long, value_name = "NAME", requires = "vlm")]
    pub vlm_model: Option<String>,
    /// Environment variable holding the API key (sent as a bearer token; only the variable's
    /// name is saved).
    #[arg(long, value_name = "VAR", requires = "vlm")]
    pub vlm_key_env: Option<String>,
    /// Requests in flight at once (a batch's images are scored in parallel up to this).
    #[arg(long, value_name = "N", default_value_t = defaults().concurrency)]
    pub vlm_concurrency: usize,
    /// Seconds one request may take before it counts as failed.
    #[arg(long, value_name = "SECS", default_value_t = defaults().timeout_secs)]
    pub vlm_timeout: f64,
    /// Retries of a request after a 429, a 5xx, a timeout or a connection error (waits of 0.25 s,
    /// doubling).
    #[arg(long, value_name = "N", default_value_t = defaults().retries)]
    pub vlm_retries: usize,
    /// `max_tokens` of each request.
    #[arg(long, value_name = "N", default_value_t = defaults().max_tokens)]
    pub vlm_max_tokens: usize,
    /// `seed` of each request (with temperature 0).
    #[arg(long, value_name = "N", default_value_t = defaults().seed)]
    pub vlm_seed: u64,
    /// Requests per epoch at most (retries included); past it the epoch fails.
    #[arg(long, value_name = "N", default_value_t = defaults().epoch_requests)]
    pub vlm_epoch_requests: usize,
    /// Seconds per epoch of VLM requests at most, from the epoch's first one.
    #[arg(long, value_name = "SECS", default_value_t = defaults().epoch_seconds)]
    pub vlm_epoch_seconds: f64,
}

impl VlmArgs {
    /// The endpoint the flags configure (`None` without `--vlm`), validated.
    pub fn config(&self) -> anyhow::Result<Option<VlmConfig>> {
        let Some(url) = &self.vlm else { return Ok(None) };
        let config = VlmConfig {
            url: url.clone(),
            model: self.vlm_model.clone().unwrap_or_default(),
            key_env: self.vlm_key_env.clone(),
            concurrency: self.vlm_concurrency,
            timeout_secs: self.vlm_timeout,
            retries: self.vlm_retries,
            max_tokens: self.vlm_max_tokens,
            seed: self.vlm_seed,
            epoch_requests: self.vlm_epoch_requests,
            epoch_seconds: self.vlm_epoch_seconds,
        };
        config.validate().map_err(super::flag_error)?;
        Ok(Some(config))
    }
}

/// `ddpo vlm-server`.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Port on 127.0.0.1 (0: a free one; the URL is printed on stdout).
    #[arg(long, default_value_t = 8089)]
    port: u16,
    /// Milliseconds added to every reply (a slow model).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    delay_ms: u64,
    /// Answer every N-th chat request with HTTP 500 (0: never).
    #[arg(long, value_name = "N", default_value_t = 0)]
    fail_every: usize,
    /// Stop after this many seconds (0: at Ctrl-C).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    seconds: u64,
}

pub fn exec(args: ServerArgs) -> anyhow::Result<()> {
    let faults = Faults {
        delay: Duration::from_millis(args.delay_ms),
        every: (args.fail_every > 0).then_some((args.fail_every, Fault::Status(500))),
        ..Default::default()
    };
    let server = Server::start(args.port, faults)?;
    println!("{}", server.url());
    eprintln!("serving {MODEL} (OpenAI-compatible chat completions) at {}: use --vlm {}; Ctrl-C stops it", server.url(), server.url());
    let stop = super::interrupt_flag_with("\nstopping the server");
    let started = Instant::now();
    let limit = (args.seconds > 0).then(|| Duration::from_secs(args.seconds));
    while !stop.load(Ordering::SeqCst) && limit.is_none_or(|l| started.elapsed() < l) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = server.stats();
    eprintln!(
        "served {} chat requests on {} connections (at most {} at once)",
        s.requests.load(Ordering::SeqCst),
        s.connections.load(Ordering::SeqCst),
        s.max_in_flight.load(Ordering::SeqCst)
    );
    Ok(())
}
