//! Rewards from vision-language models: a client of the OpenAI-compatible chat-completions API
//! that vLLM, SGLang, llama.cpp's server and Ollama serve, behind the script primitives
//! `vlm_ask` and `vlm_score`.
//!
//! - **Configuration opens the network, never a script:** [`VlmConfig`] (endpoint, model, the
//!   name of the variable holding the API key, limits) comes from the command line and is saved
//!   in the run config; scripts reach only that endpoint, through the primitives.
//! - [`client`]: [`Vlm`], the bounded client: a concurrency limit, a timeout per request,
//!   retries with exponential backoff on 429 / 5xx / connection errors, a budget per epoch, and
//!   replies cached per (image, question, model) for the run.
//! - [`server`]: a small OpenAI-compatible server on the loopback interface that answers from
//!   the shapes world (the detector's description, GenEval's score), with injectable faults; the
//!   tests, the example run and `ddpo vlm-server` use it.
//! - [`parse_score`]: the number in a judge's reply ("Final Score: 7.5").

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::error::{ensure, ConfigError};

pub use client::Vlm;

/// A vision-language model endpoint and the limits of its use (saved in the run config; the
/// API key itself never is, only the name of the variable that holds it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VlmConfig {
    /// Base URL of an OpenAI-compatible server, with or without `/v1`
    /// (`http://localhost:8000`, `http://localhost:11434/v1`).
    pub url: String,
    /// The `model` of each request; empty: the first model the server lists at `/v1/models`.
    pub model: String,
    /// Environment variable holding the API key sent as `Authorization: Bearer`.
    pub key_env: Option<String>,
    /// Requests in flight at once (over all reward workers).
    pub concurrency: usize,
    /// Seconds one request may take, connection included.
    pub timeout_secs: f64,
    /// Further attempts after a 429, a 5xx, a timeout or a connection error.
    pub retries: usize,
    /// `max_tokens` of each request.
    pub max_tokens: usize,
    /// `seed` of each request (with `temperature` 0, so a judge's reply is reproducible).
    pub seed: u64,
    /// HTTP attempts per epoch (retries included).
    pub epoch_requests: usize,
    /// Seconds per epoch from its first request after which no further request starts.
    pub epoch_seconds: f64,
}

impl Default for VlmConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            model: String::new(),
            key_env: None,
            concurrency: 8,
            timeout_secs: 60.0,
            retries: 3,
            max_tokens: 256,
            seed: 0,
            epoch_requests: 10_000,
            epoch_seconds: 3600.0,
        }
    }
}

impl VlmConfig {
    /// Checks every setting; errors name the field (`vlm_url`, `vlm_timeout`, ...).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.trim();
        ensure(url.starts_with("http://") || url.starts_with("https://"), "vlm_url", || {
            format!("must start with http:// or https://, got {:?}", self.url)
        })?;
        ensure((1..=256).contains(&self.concurrency), "vlm_concurrency", || format!("must be 1..=256, got {}", self.concurrency))?;
        ensure(self.timeout_secs > 0.0 && self.timeout_secs <= 3600.0, "vlm_timeout", || {
            format!("must be a number of seconds in (0, 3600], got {}", self.timeout_secs)
        })?;
        ensure(self.retries <= 10, "vlm_retries", || format!("must be at most 10, got {}", self.retries))?;
        ensure((1..=16_384).contains(&self.max_tokens), "vlm_max_tokens", || format!("must be 1..=16384, got {}", self.max_tokens))?;
        ensure(self.epoch_requests > 0, "vlm_epoch_requests", || "must be at least 1".into())?;
        ensure(self.epoch_seconds > 0.0 && self.epoch_seconds.is_finite(), "vlm_epoch_seconds", || {
            format!("must be a positive number of seconds, got {}", self.epoch_seconds)
        })?;
        if let Some(var) = &self.key_env {
            let ok = !var.is_empty() && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            ensure(ok, "vlm_key_env", || format!("must name an environment variable (letters, digits, _), got {var:?}"))?;
        }
        Ok(())
    }
}

/// The number a judge's `reply` gives after `pattern`, a regular expression (Rust `regex`
/// syntax): the text of its first capture group if it has one, else the first number after its
/// first match (an empty pattern: the first number in the reply). "Final Score: 7/10" with
/// pattern `Final Score:` gives 7.
pub fn parse_score(reply: &str, pattern: &str) -> anyhow::Result<f64> {
    let re = regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| anyhow::anyhow!("pattern {pattern:?} is not a valid regular expression: {}", first_line(&e.to_string())))?;
    let no_number = || anyhow::anyhow!("the reply {:?} has no number after pattern {pattern:?}; ask for the score in that format, or change the pattern", excerpt(reply));
    let found = re.captures(reply).ok_or_else(no_number)?;
    let text = match found.get(1) {
        Some(group) => group.as_str(),
        None => &reply[found.get(0).map_or(0, |m| m.end())..],
    };
    leading_number(text.trim_start()).ok_or_else(no_number)
}

/// The first number in `text` (sign, digits, decimals), skipping anything before it.
fn leading_number(text: &str) -> Option<f64> {
    static NUMBER: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = NUMBER.get_or_init(|| regex::Regex::new(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?").expect("valid number pattern"));
    re.find(text).and_then(|m| m.as_str().parse::<f64>().ok()).filter(|x| x.is_finite())
}

/// The first line of `text`.
fn first_line(text: &str) -> &str {
    text.lines().find(|l| !l.trim().is_empty()).unwrap_or(text)
}

/// `text` cut to 200 characters, for error messages.
pub(crate) fn excerpt(text: &str) -> String {
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_follow_the_pattern() {
        assert_eq!(parse_score("The image is fine. Final Score: 7.5", "Final Score:").unwrap(), 7.5);
        assert_eq!(parse_score("Final Score: 7/10", "Final Score:").unwrap(), 7.0);
        assert_eq!(parse_score("score=-3e1 ok", r"score=(\S+)").unwrap(), -30.0);
        assert_eq!(parse_score("about 4 of 5", "").unwrap(), 4.0);
        let e = parse_score("I cannot tell.", "Final Score:").unwrap_err().to_string();
        assert!(e.contains("no number") && e.contains("I cannot tell."), "{e}");
        let e = parse_score("Final Score: none", "Final Score:").unwrap_err().to_string();
        assert!(e.contains("no number"), "{e}");
        let e = parse_score("1", "(").unwrap_err().to_string();
        assert!(e.contains("not a valid regular expression"), "{e}");
    }

    #[test]
    fn config_is_checked() {
        let ok = VlmConfig { url: "http://127.0.0.1:8000".into(), ..Default::default() };
        ok.validate().unwrap();
        let bad = |c: VlmConfig| c.validate().unwrap_err().field;
        assert_eq!(bad(VlmConfig { url: "ftp://x".into(), ..ok.clone() }), "vlm_url");
        assert_eq!(bad(VlmConfig { concurrency: 0, ..ok.clone() }), "vlm_concurrency");
        assert_eq!(bad(VlmConfig { timeout_secs: 0.0, ..ok.clone() }), "vlm_timeout");
        assert_eq!(bad(VlmConfig { key_env: Some("A-B".into()), ..ok.clone() }), "vlm_key_env");
    }
}
