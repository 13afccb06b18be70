//! Rewards from vision-language models, end to end against a real HTTP server on the loopback
//! interface (`reward::vlm::server`, answering from the shapes world): the concurrency limit,
//! timeouts and retries on injected faults, an unreachable endpoint failing an epoch in bounded
//! time, the reply cache, clear errors on bad replies, and scripts reaching no other address.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use common::fixtures::small_config;
use common::gaussian::GaussianFamily;
use ddpo::ddpo::{Normalisation, TrainConfig};
use ddpo::family::{Family, SamplerConfig};
use ddpo::reward::models::{LazyModels, ModelPaths};
use ddpo::reward::vlm::server::{Fault, Faults, Server, MODEL};
use ddpo::reward::vlm::{Vlm, VlmConfig};
use ddpo::reward::Reward;
use ddpo::run::{RewardSpec, RunConfig};
use ddpo::script::{Limits, ScriptSet};
use ddpo::session::{OnScriptError, ScriptPaths, Session};
use image::RgbImage;

fn server(faults: Faults) -> Server {
    Server::start(0, faults).unwrap()
}

fn config(url: &str) -> VlmConfig {
    VlmConfig { url: url.into(), model: MODEL.into(), concurrency: 4, timeout_secs: 2.0, retries: 2, ..Default::default() }
}

/// `n` shapes-world images and their captions.
fn batch(seed: u64, n: usize) -> (Vec<RgbImage>, Vec<String>) {
    ddpo::world::ShapesWorld::default().batch(seed, n).into_iter().map(|s| (s.image, s.caption)).unzip()
}

fn quiet() -> ddpo::script::Log {
    Arc::new(|_: &str| {})
}

/// A reward script in a fresh folder.
fn script(dir: &Path, source: &str) -> PathBuf {
    let path = dir.join("reward.rhai");
    std::fs::write(&path, source).unwrap();
    path
}

/// GenEval's score of the image against its prompt, as the judge says it.
const JUDGE: &str = r#"fn reward(img, prompt, meta) {
    vlm_score(img, "Score the image against \"" + prompt + "\" from 0 to 10.", "Final Score:")
}"#;

fn models(vlm: VlmConfig) -> LazyModels {
    LazyModels::new(ModelPaths { vlm: Some(vlm), ..Default::default() }, Device::Cpu)
}

fn requests(s: &Server) -> usize {
    s.stats().requests.load(Ordering::SeqCst)
}

#[test]
fn the_concurrency_limit_holds_and_requests_overlap() {
    let s = server(Faults { delay: Duration::from_millis(150), ..Default::default() });
    let vlm = Arc::new(Vlm::new(VlmConfig { concurrency: 3, ..config(&s.url()) }).unwrap());
    let (images, _) = batch(1, 12);
    let t = Instant::now();
    std::thread::scope(|scope| {
        for img in &images {
            let vlm = vlm.clone();
            scope.spawn(move || vlm.ask(img, "What is in this image?").unwrap());
        }
    });
    let elapsed = t.elapsed();
    assert_eq!(requests(&s), 12);
    assert_eq!(s.stats().max_in_flight.load(Ordering::SeqCst), 3, "12 threads asking, 3 permits");
    // Serial would take 12 x 150 ms; three at a time takes about four rounds.
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
}

#[test]
fn a_script_reward_scores_its_batch_in_parallel_with_the_serial_results() {
    let dir = tempfile::tempdir().unwrap();
    let path = script(dir.path(), JUDGE);
    let s = server(Faults { delay: Duration::from_millis(100), ..Default::default() });
    let (images, prompts) = batch(7, 8);
    let score = |concurrency: usize| {
        let mut set = ScriptSet::new(Limits::default(), quiet()).with_models(models(VlmConfig { concurrency, ..config(&s.url()) }));
        let reward = set.load_reward(&path).unwrap();
        let t = Instant::now();
        let totals: Vec<f64> = reward.score(&images, &prompts).unwrap().iter().map(|x| x.total).collect();
        (totals, t.elapsed())
    };
    let (serial, serial_time) = score(1);
    assert_eq!(s.stats().max_in_flight.load(Ordering::SeqCst), 1);
    let (parallel, parallel_time) = score(8);
    assert_eq!(parallel, serial, "the same scores, in the same order");
    let most = s.stats().max_in_flight.load(Ordering::SeqCst);
    assert!(most >= 4, "the batch's requests overlap: at most {most} at once; parallel {parallel_time:?}, serial {serial_time:?}");
    assert!(parallel_time * 2 < serial_time, "parallel {parallel_time:?}, serial {serial_time:?}");
    assert!(serial.iter().all(|x| (0.0..=10.0).contains(x)) && serial.iter().any(|x| *x > 0.0), "{serial:?}");
}

#[test]
fn injected_500s_and_429s_are_retried() {
    let s = server(Faults { first: vec![Fault::Status(500), Fault::Status(429)], ..Default::default() });
    let vlm = Vlm::new(config(&s.url())).unwrap();
    let (images, _) = batch(2, 1);
    let reply = vlm.ask(&images[0], "Describe the image.").unwrap();
    assert!(reply.ends_with("background"), "{reply}");
    assert_eq!(requests(&s), 3);
    assert_eq!(vlm.stats.retries.load(Ordering::SeqCst), 2);
}

#[test]
fn a_slow_reply_times_out_and_the_retry_answers() {
    let s = server(Faults { first: vec![Fault::Delay(Duration::from_secs(3))], ..Default::default() });
    let vlm = Vlm::new(VlmConfig { timeout_secs: 0.5, retries: 1, ..config(&s.url()) }).unwrap();
    let (images, _) = batch(3, 1);
    let t = Instant::now();
    vlm.ask(&images[0], "Describe the image.").unwrap();
    assert!(t.elapsed() < Duration::from_millis(2000), "timed out at 0.5 s, not after the 3 s delay: {:?}", t.elapsed());
    assert_eq!(vlm.stats.retries.load(Ordering::SeqCst), 1);
}

#[test]
fn retries_run_out_with_an_error_that_says_what_to_do() {
    let s = server(Faults { every: Some((1, Fault::Status(503))), ..Default::default() });
    let vlm = Vlm::new(config(&s.url())).unwrap();
    let (images, _) = batch(4, 1);
    let e = format!("{:#}", vlm.ask(&images[0], "Describe the image.").unwrap_err());
    assert!(e.contains("HTTP 503") && e.contains("after 3 attempts") && e.contains("--vlm"), "{e}");
    assert_eq!(requests(&s), 3);
}

#[test]
fn malformed_and_numberless_replies_are_clear_errors_naming_the_sample() {
    let s = server(Faults { first: vec![Fault::Malformed], ..Default::default() });
    let vlm = Vlm::new(config(&s.url())).unwrap();
    let (images, prompts) = batch(5, 2);
    let e = format!("{:#}", vlm.ask(&images[0], "Describe the image.").unwrap_err());
    assert!(e.contains("malformed reply") && e.contains("OpenAI-compatible"), "{e}");
    assert_eq!(requests(&s), 1, "a malformed reply is not retried");

    // The dry run of loading asks 4 questions; the scored batch's second one gets no number.
    let s = server(Faults { first: vec![Fault::Delay(Duration::ZERO); 5].into_iter().chain([Fault::NoNumber]).collect(), ..Default::default() });
    let dir = tempfile::tempdir().unwrap();
    let mut set = ScriptSet::new(Limits::default(), quiet()).with_models(models(VlmConfig { concurrency: 1, ..config(&s.url()) }));
    let reward = set.load_reward(&script(dir.path(), JUDGE)).unwrap();
    let e = format!("{:#}", reward.score(&images, &prompts).unwrap_err());
    assert!(e.contains("no number after pattern \"Final Score:\"") && e.contains("sample 1") && e.contains(&prompts[1]), "{e}");
    assert!(e.contains("reward.rhai:2:"), "the script's line: {e}");
}

#[test]
fn the_cache_answers_repeated_questions() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(Faults::default());
    let mut set = ScriptSet::new(Limits::default(), quiet()).with_models(models(config(&s.url())));
    // Two questions per image, the second one twice.
    let reward = set
        .load_reward(&script(dir.path(), r#"fn reward(img, prompt, meta) {
            let d = vlm_ask(img, "Describe the image.");
            let again = vlm_ask(img, "Describe the image.");
            if d != again { throw "the cache changed the reply"; }
            vlm_score(img, "Score the image against \"" + prompt + "\".", "Final Score:")
        }"#))
        .unwrap();
    let after_load = requests(&s);
    assert_eq!(after_load, 8, "4 dry-run images x 2 distinct questions");
    let (images, prompts) = batch(6, 6);
    let first = reward.score(&images, &prompts).unwrap();
    assert_eq!(requests(&s) - after_load, 12, "6 images x 2 distinct questions");
    let second = reward.score(&images, &prompts).unwrap();
    assert_eq!(requests(&s) - after_load, 12, "a second pass over the same images asks nothing");
    assert_eq!(first, second);
}

#[test]
fn scripts_reach_only_the_configured_endpoint() {
    // No primitive takes an address: the VLM ones take an image and text only.
    for p in ddpo::reward::registry::VLM_PRIMITIVES {
        assert!(p.params.iter().all(|t| matches!(t, ddpo::reward::registry::Param::Image | ddpo::reward::registry::Param::Text)));
    }
    for entry in ddpo::script::api::entries() {
        let sig = entry.signature.to_lowercase();
        assert!(!["url", "host", "endpoint", "address"].iter().any(|w| sig.contains(w)), "{sig}");
    }

    let configured = server(Faults::default());
    let other = server(Faults::default());
    let dir = tempfile::tempdir().unwrap();
    let mut set = ScriptSet::new(Limits::default(), quiet()).with_models(models(config(&configured.url())));
    // A question naming another address is only text sent to the configured server.
    let named = format!(r#"fn reward(img, prompt, meta) {{ vlm_ask(img, "{}/v1/chat/completions").len() }}"#, other.url());
    set.load_reward(&script(dir.path(), &named)).unwrap();
    // An extra argument is no way to choose the server either.
    let extra = format!(r#"fn reward(img, prompt, meta) {{ vlm_ask(img, "Describe the image.", "{}").len() }}"#, other.url());
    let e = format!("{:#}", set.load_reward(&script(dir.path(), &extra)).err().unwrap());
    assert!(e.contains("vlm_ask") && e.contains("not found"), "{e}");
    assert_eq!(requests(&other), 0, "the other server heard nothing");
    assert_eq!(requests(&configured), 4);

    // Without --vlm, the primitives say which flag opens the network.
    let mut bare = ScriptSet::new(Limits::default(), quiet());
    let e = format!("{:#}", bare.load_reward(&script(dir.path(), JUDGE)).err().unwrap());
    assert!(e.contains("--vlm URL") && e.contains("sample 0"), "{e}");
}

#[test]
fn a_waiting_vlm_call_is_exempt_from_the_script_time_limit() {
    let s = server(Faults { delay: Duration::from_millis(400), ..Default::default() });
    let dir = tempfile::tempdir().unwrap();
    // Only the clock can stop a runaway here.
    let limits = Limits { time_limit: Duration::from_millis(150), max_operations: 0, ..Limits::default() };
    let mut set = ScriptSet::new(limits, quiet()).with_models(models(config(&s.url())));
    let reward = set.load_reward(&script(dir.path(), JUDGE)).unwrap();
    let (images, prompts) = batch(8, 2);
    reward.score(&images, &prompts).unwrap();
    // A runaway loop after the call is still stopped.
    let spin = r#"fn reward(img, prompt, meta) { let d = vlm_ask(img, "Describe it."); loop { } }"#;
    let e = format!("{:#}", set.load_reward(&script(dir.path(), spin)).err().unwrap());
    assert!(e.contains("exceeded the time limit"), "{e}");
}

#[test]
fn the_model_name_is_read_from_the_server_when_not_given() {
    let s = server(Faults::default());
    let vlm = Vlm::new(VlmConfig { model: String::new(), ..config(&format!("{}/v1/", s.url())) }).unwrap();
    let (images, _) = batch(9, 1);
    assert!(vlm.ask(&images[0], "Describe the image.").unwrap().ends_with("background"));
}

fn gaussian_run(reward: &Path, vlm: VlmConfig) -> RunConfig {
    let train = TrainConfig {
        samples_per_epoch: 8,
        sample_batch_size: 4,
        train_batch_size: 4,
        normalisation: Normalisation::Batch,
        sampler: SamplerConfig::new(2, 1.0, 1.0),
        min_train_sigma: 0.0,
        ..small_config()
    };
    RunConfig {
        train,
        model: "gaussian".into(),
        reward: RewardSpec::Script(reward.to_path_buf()),
        prompts: vec!["a red circle on a blue background".into()],
        epochs: 2,
        checkpoint_every: 1,
        ranks: 1,
        lora: None,
        dtype: Default::default(),
        reward_models: ModelPaths { vlm: Some(vlm), ..Default::default() },
        clip_sample: None,
        eval: None,
    }
}

fn open_gaussian(_: &RunConfig, _frozen: bool) -> anyhow::Result<Box<dyn Family>> {
    Ok(Box::new(GaussianFamily::new(-0.5)))
}

struct Lines(Vec<String>);

impl ddpo::session::Observer for Lines {
    fn line(&mut self, text: &str) {
        self.0.push(text.to_string());
    }
    fn epoch(&mut self, _: &ddpo::session::EpochLog) {}
}

#[test]
fn an_unreachable_endpoint_fails_the_epoch_within_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = script(dir.path(), JUDGE);
    let s = server(Faults::default());
    let vlm = VlmConfig { timeout_secs: 1.0, retries: 2, ..config(&s.url()) };
    let run = dir.path().join("run");
    let session = Session::create_with(&run, gaussian_run(&path, vlm.clone()), ScriptPaths::default(), quiet(), &Device::Cpu, &open_gaussian).unwrap();
    let mut session = session.on_script_error(OnScriptError::Exit);
    drop(s); // the server goes away after the run started: its port is closed now
    let t = Instant::now();
    let mut lines = Lines(Vec::new());
    let e = format!("{:#}", session.train(2, &mut lines, &AtomicBool::new(false)).unwrap_err());
    // Each sample: 3 attempts and backoffs of 0.25 + 0.5 s, its batch's samples in parallel.
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert!(e.contains("stopped at epoch 0"), "{e}");
    let aborted = lines.0.iter().find(|l| l.contains("aborted")).unwrap_or_else(|| panic!("{:?}", lines.0));
    assert!(aborted.contains("connection") && aborted.contains("sample") && aborted.contains("a red circle on a blue background"), "{aborted}");
    assert!(aborted.contains(&format!("check that the server at {} is up", vlm.url)), "{aborted}");
}

#[test]
fn a_run_saves_the_endpoint_but_never_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = script(dir.path(), JUDGE);
    let s = server(Faults::default());
    std::env::set_var("DDPO_TEST_VLM_KEY", "sk-secret-value");
    let vlm = VlmConfig { key_env: Some("DDPO_TEST_VLM_KEY".into()), ..config(&s.url()) };
    let run = dir.path().join("run");
    let mut session = Session::create_with(&run, gaussian_run(&path, vlm.clone()), ScriptPaths::default(), quiet(), &Device::Cpu, &open_gaussian).unwrap();
    session.train(1, &mut Lines(Vec::new()), &AtomicBool::new(false)).unwrap();
    let saved = std::fs::read_to_string(run.join("config.json")).unwrap();
    assert!(saved.contains(&s.url()) && saved.contains("DDPO_TEST_VLM_KEY") && !saved.contains("sk-secret"), "{saved}");
    let loaded: RunConfig = serde_json::from_str(&saved).unwrap();
    assert_eq!(loaded.reward_models.vlm, Some(vlm));
}

#[test]
fn ddpo_check_takes_the_vlm_flags() {
    let s = server(Faults::default());
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/examples/vlm_alignment.rhai");
    let run = |extra: &[&str]| {
        let mut args = vec!["check".to_string(), example.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        std::process::Command::new(env!("CARGO_BIN_EXE_ddpo")).args(&args).output().unwrap()
    };
    let out = run(&["--vlm", &s.url(), "--vlm-concurrency", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains(": ok (reward"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stdout).contains("--vlm URL"));
    let out = run(&["--vlm", "ftp://x"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--vlm must start with http://"), "{stderr}");
    let out = run(&["--vlm", &s.url(), "--vlm-timeout", "0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vlm-timeout must be"), "{}", String::from_utf8_lossy(&out.stderr));
}
