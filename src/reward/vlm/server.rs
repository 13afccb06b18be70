//! A small OpenAI-compatible server on the loopback interface that "sees" with the shapes
//! world: `POST /v1/chat/completions` decodes the message's image and answers from the shapes
//! detector, `GET /v1/models` lists its one model. It exercises the whole client path (encoding,
//! concurrency, timeouts, retries, parsing, caching) without a GPU; the tests, the example run
//! and `ddpo vlm-server` use it.
//!
//! - A question that asks for a **score** and quotes a caption ("... \"a red circle on a blue
//!   background\" ...") gets `Final Score: N`, N = 10 x GenEval's partial score of the image
//!   against that caption.
//! - Any other question gets a **description** in the caption grammar, e.g. "a red circle and a
//!   blue square on a white background" (unrecognised blobs are named by their best-fitting
//!   shape, as a real model would guess).
//! - **Faults** for tests: a delay, statuses (500, 429), malformed bodies and replies without a
//!   number, for the first requests or every n-th one.
//!
//! It binds 127.0.0.1 only, serves connections on threads (at most [`MAX_CONNECTIONS`]), and
//! stops when dropped; idle connections close after [`IDLE`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use image::RgbImage;
use serde_json::{json, Value};

use crate::world::caption::{CaptionSpec, ShapeSpec, Size};

/// The model name the server lists.
pub const MODEL: &str = "shapes-vlm";
/// Connections served at once; more are answered 503.
pub const MAX_CONNECTIONS: usize = 64;
/// An idle connection is closed after this long.
pub const IDLE: Duration = Duration::from_secs(5);
const MAX_HEADER_BYTES: u64 = 64 * 1024;
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// A fault the server injects into a chat request.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this HTTP status (e.g. 500, 429) and an error body.
    Status(u16),
    /// Answer 200 with a body that is not a chat completion.
    Malformed,
    /// Answer a reply without a number in it.
    NoNumber,
    /// Answer normally after this extra delay.
    Delay(Duration),
}

/// Which chat requests get faults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Added before every chat reply.
    pub delay: Duration,
    /// One fault for each of the first chat requests, in order.
    pub first: Vec<Fault>,
    /// Every n-th chat request (counting from 1) after those gets the fault.
    pub every: Option<(usize, Fault)>,
}

impl Faults {
    /// The fault of chat request `n` (1-based), if any.
    fn of(&self, n: usize) -> Option<&Fault> {
        if let Some(f) = self.first.get(n - 1) {
            return Some(f);
        }
        self.every.as_ref().filter(|(k, _)| n.is_multiple_of(*k)).map(|(_, f)| f)
    }
}

/// What the server has seen.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Chat requests received.
    pub requests: AtomicUsize,
    /// Chat requests being answered now, and the most at once.
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// Connections accepted.
    pub connections: AtomicUsize,
}

/// A running server; it stops when dropped.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts a server on 127.0.0.1:`port` (0: a free port).
    pub fn start(port: u16, faults: Faults) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).with_context(|| format!("cannot listen on 127.0.0.1:{port} (in use? pick another --port)"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ServerStats::default());
        let shared = Arc::new(Shared { faults, stats: stats.clone(), stop: stop.clone(), live: AtomicUsize::new(0) });
        let accept = std::thread::Builder::new().name("vlm-server".into()).spawn(move || accept_loop(listener, shared))?;
        Ok(Self { addr, stop, stats, accept: Some(accept) })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept, which then sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

struct Shared {
    faults: Faults,
    stats: Arc<ServerStats>,
    stop: Arc<AtomicBool>,
    /// Connections being served.
    live: AtomicUsize,
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(mut stream) = stream else { continue };
        if shared.live.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.live.fetch_sub(1, Ordering::SeqCst);
            let _ = write_response(&mut stream, 503, &json!({"error": {"message": "too many connections"}}).to_string(), true);
            continue;
        }
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let spawned = std::thread::Builder::new().name("vlm-conn".into()).spawn(move || {
            let _ = serve_connection(stream, &shared);
            shared.live.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            break;
        }
    }
}

/// One HTTP request.
struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
    close: bool,
}

/// Serves requests on one keep-alive connection until it closes, idles or the server stops.
fn serve_connection(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IDLE))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    while !shared.stop.load(Ordering::SeqCst) {
        let request = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => {
                let _ = write_response(&mut writer, 400, &error_body(&e.to_string()), true);
                return Ok(());
            }
        };
        let (status, body) = route(&request, shared);
        write_response(&mut writer, status, &body, request.close)?;
        if request.close {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads one request; `None` when the client closed the connection or it idled out.
fn read_request(reader: &mut BufReader<TcpStream>) -> anyhow::Result<Option<Request>> {
    let mut head = String::new();
    let mut limited = reader.take(MAX_HEADER_BYTES);
    loop {
        let before = head.len();
        match limited.read_line(&mut head) {
            Ok(0) if head.is_empty() => return Ok(None),
            Ok(0) => anyhow::bail!("the request ended inside its header"),
            Ok(_) => {}
            Err(e) if head.is_empty() && matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        if head[before..].trim_end().is_empty() && before > 0 {
            break;
        }
        anyhow::ensure!(limited.limit() > 0, "the request header is over {MAX_HEADER_BYTES} bytes");
    }
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let (method, path) = (first.next().unwrap_or_default().to_string(), first.next().unwrap_or_default().to_string());
    let (mut length, mut close) = (0usize, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().context("a bad Content-Length")?,
            "connection" => close = value.trim().eq_ignore_ascii_case("close"),
            "transfer-encoding" => anyhow::bail!("chunked request bodies are not supported; send a Content-Length"),
            _ => {}
        }
    }
    anyhow::ensure!(length <= MAX_BODY_BYTES, "the request body is over {MAX_BODY_BYTES} bytes");
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Some(Request { method, path, body, close }))
}

fn write_response(w: &mut impl Write, status: u16, body: &str, close: bool) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        s if s >= 500 => "Internal Server Error",
        _ => "Error",
    };
    let connection = if close { "close" } else { "keep-alive" };
    write!(w, "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}", body.len())?;
    w.flush()
}

fn error_body(message: &str) -> String {
    json!({ "error": { "message": message } }).to_string()
}

/// The status and body answering `request`.
fn route(request: &Request, shared: &Shared) -> (u16, String) {
    let path = request.path.trim_end_matches('/');
    match (request.method.as_str(), path) {
        ("GET", "/v1/models") => (200, json!({ "object": "list", "data": [{ "id": MODEL, "object": "model", "owned_by": "ddpo" }] }).to_string()),
        ("POST", "/v1/chat/completions") => {
            let stats = &shared.stats;
            let n = stats.requests.fetch_add(1, Ordering::SeqCst) + 1;
            let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let answer = chat(&request.body, shared.faults.delay, shared.faults.of(n));
            stats.in_flight.fetch_sub(1, Ordering::SeqCst);
            answer
        }
        _ => (404, error_body(&format!("no route {} {}", request.method, request.path))),
    }
}

/// Answers one chat-completions body, with `fault` injected.
fn chat(body: &[u8], delay: Duration, fault: Option<&Fault>) -> (u16, String) {
    std::thread::sleep(delay);
    match fault {
        Some(Fault::Status(s)) => return (*s, error_body(&format!("injected HTTP {s}"))),
        Some(Fault::Malformed) => return (200, "{\"choices\": [".into()),
        Some(Fault::Delay(d)) => std::thread::sleep(*d),
        _ => {}
    }
    let (image, question) = match read_message(body) {
        Ok(m) => m,
        Err(e) => return (400, error_body(&format!("{e:#}"))),
    };
    let reply = if fault == Some(&Fault::NoNumber) { "I am not sure what I see.".to_string() } else { answer(&image, &question) };
    let completion = json!({
        "id": "chatcmpl-shapes",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": reply }, "finish_reason": "stop" }],
    });
    (200, completion.to_string())
}

/// The image and the question of the last user message of a chat-completions body.
fn read_message(body: &[u8]) -> anyhow::Result<(RgbImage, String)> {
    let v: Value = serde_json::from_slice(body).context("the body is not JSON")?;
    let messages = v["messages"].as_array().context("no `messages` array")?;
    let message = messages.iter().rev().find(|m| m["role"] == "user").context("no user message")?;
    let parts = message["content"].as_array().context("the user message has no content parts (an image and a question)")?;
    let question: String = parts.iter().filter(|p| p["type"] == "text").filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join("\n");
    let url = parts.iter().find_map(|p| p["image_url"]["url"].as_str()).context("no image_url part")?;
    let data = url.split_once(";base64,").map(|(_, d)| d).context("the image URL is not a base64 data URL")?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(data).context("the image's base64 does not decode")?;
    let image = image::load_from_memory(&bytes).context("the image does not decode")?.to_rgb8();
    Ok((image, question))
}

/// The server's reply to `question` about `image`: a score for a question asking for one
/// (against the caption it quotes), else a description.
pub fn answer(image: &RgbImage, question: &str) -> String {
    if !question.to_ascii_lowercase().contains("score") {
        return describe(image);
    }
    let Some(caption) = question.split('"').nth(1).filter(|_| question.matches('"').count() >= 2) else {
        return "Please quote the caption to score against in double quotes.".into();
    };
    match crate::world::geneval::geneval(image, caption) {
        Ok(s) => format!("The image matches some of the caption.\nFinal Score: {:.1}", 10.0 * s.partial),
        Err(_) => format!("I cannot score against \"{caption}\": I do not understand that caption."),
    }
}

/// The detector's reading of `image` as a caption ("two red circles on a blue background"):
/// the two largest groups of same-looking objects, counts up to three.
pub fn describe(image: &RgbImage) -> String {
    let d = crate::world::detect::detect(image);
    let Some(&first_bg) = d.background.first() else { return "an image without a clear background".into() };
    let mut shapes: Vec<ShapeSpec> = Vec::new();
    for o in &d.objects {
        let kind = o.shape.unwrap_or(o.best_fit);
        if let Some(g) = shapes.iter_mut().find(|g| g.colour == o.colour && g.kind == kind) {
            g.count = (g.count + 1).min(3);
        } else if shapes.len() < 2 {
            shapes.push(ShapeSpec { colour: o.colour, kind, size: Size::Medium, count: 1 });
        }
    }
    if shapes.is_empty() {
        return format!("a plain {} background", first_bg.name());
    }
    // Two single shapes: where the first stands, as the suite's detector judges it (so a reward
    // on the description can tell "above" from "below").
    let relation = match (&shapes[..], &d.objects[..]) {
        ([a, b], [first, second]) if a.count == 1 && b.count == 1 => crate::world::geneval::relations(first, second).first().copied(),
        _ => None,
    };
    CaptionSpec { background: d.background.iter().take(2).copied().collect(), shapes, relation }.caption()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_come_from_the_shapes_world() {
        let sample = crate::world::ShapesWorld::default().batch(3, 1).remove(0);
        let described = describe(&sample.image);
        assert!(described.ends_with("background"), "{described}");
        // A rendered relation is described as such, and the reverse layout the other way round.
        for caption in ["a yellow triangle above a purple ring on a green background", "a purple ring above a yellow triangle on a green background"] {
            let spec = crate::world::parse_caption(caption).unwrap();
            let img = crate::world::Scene::layout(&spec, 32, &mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(4)).render(4);
            let said = describe(&img);
            assert!(said.contains("above") || said.contains("below"), "{caption}: {said}");
            // "triangle above ring" and "ring below triangle" say the same.
            let triangle_on_top = said.contains("above") == (said.find("triangle") < said.find("ring"));
            assert_eq!(triangle_on_top, caption.starts_with("a yellow triangle"), "{caption}: {said}");
        }
        let score = answer(&sample.image, &format!("Score the image against \"{}\" from 0 to 10.", sample.caption));
        let n = super::super::parse_score(&score, "Final Score:").unwrap();
        assert!((0.0..=10.0).contains(&n), "{score}");
        assert!(!answer(&sample.image, "Give a score please").contains("Final Score"));
    }

    #[test]
    fn faults_follow_their_schedule() {
        let f = Faults { first: vec![Fault::Status(500)], every: Some((3, Fault::NoNumber)), ..Default::default() };
        assert_eq!(f.of(1), Some(&Fault::Status(500)));
        assert_eq!(f.of(2), None);
        assert_eq!(f.of(3), Some(&Fault::NoNumber));
        assert_eq!(f.of(6), Some(&Fault::NoNumber));
    }
}
