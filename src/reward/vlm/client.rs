//! [`Vlm`]: the chat-completions client behind `vlm_ask` and `vlm_score`. One per run, shared by
//! every reward worker and scoring thread; every wait in it is bounded (a timeout per request,
//! a fixed number of retries, a budget per epoch), so a dead or slow server fails the epoch
//! with an error instead of hanging it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use image::RgbImage;
use serde_json::{json, Value};

use super::{excerpt, VlmConfig};

/// Replies kept before the cache is cleared (a few epochs' worth of questions).
const CACHE_LIMIT: usize = 16_384;
/// First backoff after a failed attempt; doubles per attempt, capped at [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// Counters of a client's work, for tests, logs and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    /// HTTP attempts made (retries included).
    pub requests: AtomicUsize,
    /// Questions answered from the cache.
    pub cache_hits: AtomicUsize,
    /// Attempts that failed and were retried.
    pub retries: AtomicUsize,
}

/// The client of one endpoint.
pub struct Vlm {
    config: VlmConfig,
    /// `{base}/v1`.
    api: String,
    key: Option<String>,
    agent: ureq::Agent,
    /// The model name: configured, or listed by the server on first use.
    model: Mutex<Option<String>>,
    permits: Permits,
    budget: Mutex<Budget>,
    cache: Mutex<HashMap<(u64, String, String), Arc<str>>>,
    pub stats: Stats,
}

/// How an attempt failed.
enum Failure {
    /// Worth another attempt (429, 5xx, timeout, connection error).
    Transient(String),
    /// Not worth one (other statuses, a malformed reply, a spent budget).
    Fatal(anyhow::Error),
}

impl Vlm {
    /// A client for `config` (validated); reads the API key from its variable now.
    pub fn new(config: VlmConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let key = match &config.key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                anyhow::anyhow!("the VLM API key variable {var} is not set; export it, or leave out --vlm-key-env for a server without a key")
            })?),
            None => None,
        };
        let base = config.url.trim().trim_end_matches('/');
        let api = format!("{}/v1", base.strip_suffix("/v1").unwrap_or(base));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs_f64(config.timeout_secs)))
            // Idle connections are dropped before a server's keep-alive timeout (vLLM: 5 s).
            .max_idle_age(Duration::from_secs(2))
            .max_idle_connections_per_host(config.concurrency)
            .build()
            .into();
        let model = (!config.model.is_empty()).then(|| config.model.clone());
        Ok(Self {
            permits: Permits::new(config.concurrency),
            budget: Mutex::new(Budget::default()),
            model: Mutex::new(model),
            cache: Mutex::default(),
            stats: Stats::default(),
            config,
            api,
            key,
            agent,
        })
    }

    /// Requests in flight at once at most.
    pub fn concurrency(&self) -> usize {
        self.config.concurrency
    }

    /// The chat-completions URL.
    pub fn endpoint(&self) -> String {
        format!("{}/chat/completions", self.api)
    }

    /// Starts a new epoch's budget.
    pub fn begin_epoch(&self) {
        *self.budget.lock().unwrap() = Budget::default();
    }

    /// The model's reply to `question` about `image` (cached per image, question and model).
    pub fn ask(&self, image: &RgbImage, question: &str) -> anyhow::Result<String> {
        let model = self.model()?;
        let key = (super::super::models::image_key(image), question.to_string(), model.clone());
        if let Some(reply) = self.cache.lock().unwrap().get(&key) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(reply.to_string());
        }
        let body = self.request_body(&model, image, question)?;
        let reply = self.post_with_retries(&self.endpoint(), &body, chat_reply)?;
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, Arc::from(reply.as_str()));
        Ok(reply)
    }

    /// The configured model, or the first one the server lists (asked once, until it answers).
    fn model(&self) -> anyhow::Result<String> {
        let mut model = self.model.lock().unwrap();
        if let Some(name) = model.as_ref() {
            return Ok(name.clone());
        }
        let url = format!("{}/models", self.api);
        let listed = self.attempt(&url, None, |text| {
            let v: Value = serde_json::from_str(text).ok()?;
            v["data"][0]["id"].as_str().map(str::to_string)
        });
        let name = match listed {
            Ok(name) => name,
            Err(Failure::Transient(e)) => {
                anyhow::bail!("cannot list the models at {url}: {e}; check that the server at {} is up (--vlm), or pass --vlm-model NAME", self.config.url)
            }
            Err(Failure::Fatal(e)) => return Err(e.context(format!("cannot list the models at {url}; pass --vlm-model NAME"))),
        };
        *model = Some(name.clone());
        Ok(name)
    }

    /// The chat-completions request: the image as a PNG data URL and the question, at
    /// temperature 0 with the configured seed.
    fn request_body(&self, model: &str, image: &RgbImage, question: &str) -> anyhow::Result<String> {
        let png = super::super::pixels::png_bytes(image)?;
        let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png));
        let body = json!({
            "model": model,
            "messages": [{
                "role": "user",
                "content": [
                    { "type": "image_url", "image_url": { "url": url } },
                    { "type": "text", "text": question },
                ],
            }],
            "temperature": 0,
            "seed": self.config.seed,
            "max_tokens": self.config.max_tokens,
        });
        Ok(body.to_string())
    }

    /// POSTs `body` to `url` until an attempt succeeds, a fatal failure, or the retries run out;
    /// waits between attempts grow exponentially.
    fn post_with_retries<T>(&self, url: &str, body: &str, parse: impl Fn(&str) -> Option<T>) -> anyhow::Result<T> {
        let attempts = self.config.retries + 1;
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=attempts {
            match self.attempt(url, Some(body), &parse) {
                Ok(value) => return Ok(value),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(cause)) if attempt == attempts => {
                    anyhow::bail!("{url}: {cause} (after {attempts} attempts); check that the server at {} is up (--vlm), or raise --vlm-timeout / --vlm-retries", self.config.url)
                }
                Err(Failure::Transient(_)) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// One HTTP attempt (a POST of `body`, or a GET) within the concurrency limit and the
    /// epoch's budget; `parse` reads the reply's body.
    fn attempt<T>(&self, url: &str, body: Option<&str>, parse: impl Fn(&str) -> Option<T>) -> Result<T, Failure> {
        let timeout = self.charge_budget().map_err(Failure::Fatal)?;
        let _permit = self.permits.acquire();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let sent = match body {
            Some(body) => self
                .authorised(self.agent.post(url))
                .config()
                .timeout_global(Some(timeout))
                .build()
                .header("Content-Type", "application/json")
                .send(body),
            None => self.authorised(self.agent.get(url)).config().timeout_global(Some(timeout)).build().call(),
        };
        let mut response = sent.map_err(|e| Failure::Transient(transport_error(&e, timeout)))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(|e| Failure::Transient(format!("reading the reply: {e}")))?;
        match status {
            200..=299 => parse(&text).ok_or_else(|| {
                Failure::Fatal(anyhow::anyhow!(
                    "{url} sent a malformed reply (expected a chat completion with choices[0].message.content): {:?}; is --vlm an OpenAI-compatible server?",
                    excerpt(&text)
                ))
            }),
            429 | 500..=599 => Err(Failure::Transient(format!("HTTP {status}: {}", excerpt(text.trim())))),
            401 | 403 => Err(Failure::Fatal(anyhow::anyhow!("{url}: HTTP {status} (not authorised): {}; set the API key with --vlm-key-env VAR", excerpt(text.trim())))),
            _ => Err(Failure::Fatal(anyhow::anyhow!("{url}: HTTP {status}: {}; check --vlm and --vlm-model", excerpt(text.trim())))),
        }
    }

    /// `req` with the API key, if there is one.
    fn authorised<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.key {
            Some(key) => req.header("Authorization", format!("Bearer {key}")),
            None => req,
        }
    }

    /// Counts one attempt against the epoch's budget; returns the time it may take (the
    /// request timeout, or less when the epoch's seconds are nearly spent).
    fn charge_budget(&self) -> anyhow::Result<Duration> {
        let mut b = self.budget.lock().unwrap();
        let timeout = Duration::from_secs_f64(self.config.timeout_secs);
        let epoch = Duration::from_secs_f64(self.config.epoch_seconds);
        anyhow::ensure!(
            b.requests < self.config.epoch_requests,
            "the VLM budget of {} requests per epoch is spent; raise --vlm-epoch-requests or ask fewer questions per image",
            self.config.epoch_requests
        );
        let started = *b.started.get_or_insert_with(Instant::now);
        let left = epoch.saturating_sub(started.elapsed());
        anyhow::ensure!(
            !left.is_zero(),
            "the VLM budget of {} s per epoch is spent ({} requests); raise --vlm-epoch-seconds, or use a faster server",
            self.config.epoch_seconds,
            b.requests
        );
        b.requests += 1;
        Ok(timeout.min(left))
    }
}

/// A transport error in words, with what to do about it.
fn transport_error(e: &ureq::Error, timeout: Duration) -> String {
    match e {
        ureq::Error::Timeout(_) => format!("no reply within {:.1} s", timeout.as_secs_f64()),
        ureq::Error::ConnectionFailed => "connection refused".into(),
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::Io(io) => format!("connection error: {io}"),
        other => other.to_string(),
    }
}

/// The text of a chat completion: `choices[0].message.content`, a string or text parts.
fn chat_reply(text: &str) -> Option<String> {
    let v: Value = serde_json::from_str(text).ok()?;
    match &v["choices"][0]["message"]["content"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => parts.iter().map(|p| p["text"].as_str()).collect::<Option<Vec<_>>>().map(|t| t.concat()),
        _ => None,
    }
}

/// HTTP attempts and the start of the epoch's first one.
#[derive(Default)]
struct Budget {
    requests: usize,
    started: Option<Instant>,
}

/// A counting semaphore: at most `n` holders at once.
struct Permits {
    free: Mutex<usize>,
    freed: Condvar,
}

struct Permit<'a>(&'a Permits);

impl Permits {
    fn new(n: usize) -> Self {
        Self { free: Mutex::new(n), freed: Condvar::new() }
    }

    /// Waits for a free permit (each holder's request is bounded by its timeout).
    fn acquire(&self) -> Permit<'_> {
        let mut free = self.free.lock().unwrap();
        while *free == 0 {
            free = self.freed.wait(free).unwrap();
        }
        *free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap() += 1;
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_from_strings_and_parts() {
        let s = r#"{"choices":[{"message":{"role":"assistant","content":"a red circle"}}]}"#;
        assert_eq!(chat_reply(s).as_deref(), Some("a red circle"));
        let parts = r#"{"choices":[{"message":{"content":[{"type":"text","text":"a "},{"type":"text","text":"ring"}]}}]}"#;
        assert_eq!(chat_reply(parts).as_deref(), Some("a ring"));
        assert_eq!(chat_reply(r#"{"error":"x"}"#), None);
        assert_eq!(chat_reply("not json"), None);
    }

    #[test]
    fn the_base_url_takes_v1_or_not() {
        for url in ["http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"] {
            let vlm = Vlm::new(VlmConfig { url: url.into(), model: "m".into(), ..Default::default() }).unwrap();
            assert_eq!(vlm.endpoint(), "http://h:1/v1/chat/completions", "{url}");
        }
    }

    #[test]
    fn a_missing_key_variable_is_named() {
        let config = VlmConfig { url: "http://h:1".into(), key_env: Some("DDPO_TEST_SURELY_UNSET_KEY".into()), ..Default::default() };
        let e = Vlm::new(config).err().unwrap().to_string();
        assert!(e.contains("DDPO_TEST_SURELY_UNSET_KEY") && e.contains("not set"), "{e}");
    }

    #[test]
    fn the_epoch_budget_stops_requests() {
        let vlm = Vlm::new(VlmConfig { url: "http://h:1".into(), epoch_requests: 2, ..Default::default() }).unwrap();
        vlm.charge_budget().unwrap();
        vlm.charge_budget().unwrap();
        let e = vlm.charge_budget().unwrap_err().to_string();
        assert!(e.contains("2 requests per epoch") && e.contains("--vlm-epoch-requests"), "{e}");
        vlm.begin_epoch();
        vlm.charge_budget().unwrap();
    }
}
