//! Models from a Hugging Face Hub of our own on 127.0.0.1 (`HF_ENDPOINT`):
//! it answers the Hub's repository-info and file-resolution URLs with its
//! headers (commit, ETag, linked ETag and size), redirects large files to
//! a "CDN" path, serves byte ranges, can refuse without a token, cut a
//! connection mid-file, or send slowly. The model is a tiny random llama
//! the test writes in both formats.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::harness::{Server, temp_dir, workspace};

const COMMIT: &str = "4f3c2b1a00112233445566778899aabbccddeeff";
const TOKEN: &str = "hf_e2eSecretToken0123456789";

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Default)]
struct Repo {
    files: BTreeMap<String, Arc<Vec<u8>>>,
    /// A gated repository: the token it wants.
    token: Option<String>,
}

#[derive(Default)]
struct Hub {
    base: Mutex<String>,
    repos: Mutex<HashMap<String, Repo>>,
    blobs: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    /// Every request, and those that carried our token.
    requests: AtomicUsize,
    with_token: AtomicUsize,
    /// Body bytes sent of each blob, in ranged requests of more than a byte.
    served: Mutex<HashMap<String, u64>>,
    ranges: Mutex<HashMap<String, usize>>,
    /// Cut the connection halfway through this ranged request of a blob
    /// (1-based), once.
    cut: Mutex<Option<(String, usize)>>,
    /// Send bodies in 64 KiB pieces this far apart.
    slow: Mutex<Option<Duration>>,
}

/// A Hub on 127.0.0.1; stops when dropped.
struct TestHub {
    url: String,
    hub: Arc<Hub>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestHub {
    async fn start() -> TestHub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hub = Arc::new(Hub::default());
        *hub.base.lock().unwrap() = url.clone();
        let app = axum::Router::new().fallback(handle).with_state(hub.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        TestHub { url, hub, task }
    }

    /// Publishes every file under `dir` as repository `repo` at [`COMMIT`].
    fn publish(&self, repo: &str, dir: &Path, token: Option<&str>) {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = Arc::new(std::fs::read(&path).unwrap());
            self.hub.blobs.lock().unwrap().insert(sha256(&bytes), bytes.clone());
            files.insert(path.file_name().unwrap().to_string_lossy().into_owned(), bytes);
        }
        let repo_files = Repo { files, token: token.map(String::from) };
        self.hub.repos.lock().unwrap().insert(repo.to_string(), repo_files);
    }

    fn served(&self, sha: &str) -> u64 {
        self.hub.served.lock().unwrap().get(sha).copied().unwrap_or(0)
    }
}

fn status(code: StatusCode, message: &str) -> Response {
    (code, axum::Json(json!({"error": message}))).into_response()
}

/// Large files go through the CDN, as the Hub's LFS files do.
fn is_large(file: &str) -> bool {
    file.ends_with(".safetensors") || file.ends_with(".gguf")
}

async fn handle(State(hub): State<Arc<Hub>>, uri: Uri, headers: HeaderMap) -> Response {
    hub.requests.fetch_add(1, Ordering::SeqCst);
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    if auth == format!("Bearer {TOKEN}") {
        hub.with_token.fetch_add(1, Ordering::SeqCst);
    }
    let parts: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    if let ["cdn", sha] = parts.as_slice() {
        let blob = hub.blobs.lock().unwrap().get(*sha).cloned();
        return match blob {
            Some(bytes) => ranged(&hub, sha, bytes, &headers, HeaderMap::new()).await,
            None => status(StatusCode::NOT_FOUND, "no such blob"),
        };
    }
    let (repo_id, rev, file) = match parts.as_slice() {
        ["api", "models", org, name, "revision", rev @ ..] => (format!("{org}/{name}"), rev.join("/"), None),
        [org, name, "resolve", rev, file @ ..] => {
            (format!("{org}/{name}"), rev.to_string(), Some(file.join("/")))
        }
        _ => return status(StatusCode::NOT_FOUND, "no such route"),
    };
    let (bytes, siblings) = {
        let repos = hub.repos.lock().unwrap();
        let Some(repo) = repos.get(&repo_id) else {
            return status(StatusCode::NOT_FOUND, "Repository not found");
        };
        if let Some(token) = &repo.token
            && auth != format!("Bearer {token}")
        {
            return status(StatusCode::UNAUTHORIZED, "Access to this model is restricted");
        }
        if rev != "main" && rev != COMMIT {
            return status(StatusCode::NOT_FOUND, "Revision not found");
        }
        let bytes = file.as_ref().and_then(|f| repo.files.get(f).cloned());
        (bytes, repo.files.keys().map(|f| json!({"rfilename": f})).collect::<Vec<_>>())
    };
    let Some(file) = file else {
        return axum::Json(json!({"id": repo_id, "sha": COMMIT, "siblings": siblings})).into_response();
    };
    let Some(bytes) = bytes else { return status(StatusCode::NOT_FOUND, "Entry not found") };
    let sha = sha256(&bytes);
    let mut extra = HeaderMap::new();
    extra.insert("x-repo-commit", COMMIT.parse().unwrap());
    if is_large(&file) {
        // Another origin, as the Hub's CDN is: hf-hub follows only
        // relative redirects when it reads these headers.
        let cdn = hub.base.lock().unwrap().replace("127.0.0.1", "localhost");
        extra.insert("x-linked-etag", format!("\"{sha}\"").parse().unwrap());
        extra.insert("x-linked-size", bytes.len().to_string().parse().unwrap());
        extra.insert("location", format!("{cdn}/cdn/{sha}").parse().unwrap());
        return (StatusCode::FOUND, extra).into_response();
    }
    extra.insert("etag", format!("\"{sha}\"").parse().unwrap());
    ranged(&hub, &sha, bytes, &headers, extra).await
}

/// Serves `bytes`, or the range asked for, applying the faults.
async fn ranged(
    hub: &Arc<Hub>,
    sha: &str,
    bytes: Arc<Vec<u8>>,
    headers: &HeaderMap,
    mut extra: HeaderMap,
) -> Response {
    let len = bytes.len();
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| {
            Some((a.parse::<usize>().ok()?, b.parse::<usize>().unwrap_or(len - 1).min(len - 1)))
        });
    let (start, end) = range.unwrap_or((0, len - 1));
    if start >= len || start > end {
        return status(StatusCode::RANGE_NOT_SATISFIABLE, "bad range");
    }
    let code = if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    if range.is_some() {
        extra.insert("content-range", format!("bytes {start}-{end}/{len}").parse().unwrap());
    }
    let mut stop = end + 1;
    let mut fail = false;
    if end > start {
        let n = {
            let mut ranges = hub.ranges.lock().unwrap();
            let n = ranges.entry(sha.to_string()).or_default();
            *n += 1;
            *n
        };
        let mut cut = hub.cut.lock().unwrap();
        if cut.as_ref().is_some_and(|(s, at)| s == sha && *at == n) {
            *cut = None;
            stop = start + (end + 1 - start) / 2;
            fail = true;
        }
    }
    let slow = *hub.slow.lock().unwrap();
    let counted = (end > start).then(|| (hub.clone(), sha.to_string()));
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = bytes[start..stop]
        .chunks(64 << 10)
        .map(|c| Ok(c.to_vec()))
        .chain(fail.then(|| Err(std::io::Error::other("connection cut by the test hub"))))
        .collect();
    let stream = futures_util::stream::unfold(pieces.into_iter(), move |mut it| {
        let counted = counted.clone();
        async move {
            let next = it.next()?;
            if let Some(d) = slow {
                tokio::time::sleep(d).await;
            }
            if let (Some((hub, sha)), Ok(piece)) = (&counted, &next) {
                *hub.served.lock().unwrap().entry(sha.clone()).or_default() += piece.len() as u64;
            }
            Some((next, it))
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = code;
    if !fail {
        extra.insert("content-length", (stop - start).to_string().parse().unwrap());
    }
    resp.headers_mut().extend(extra);
    resp
}

/// The tiny model written once per test process: the Hugging Face folder
/// (two shards) and the GGUF file.
fn tiny_model() -> &'static (PathBuf, PathBuf) {
    static MODEL: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| {
        let root = temp_dir("hub-model");
        let (hf, gguf) = inferd_models::testing::write_servable_tiny(&root, 2, 7).unwrap();
        let gguf_dir = root.join("gguf");
        std::fs::create_dir_all(&gguf_dir).unwrap();
        std::fs::rename(&gguf, gguf_dir.join("tiny.gguf")).unwrap();
        std::fs::write(gguf_dir.join("README.md"), "# a tiny random llama\n").unwrap();
        (hf, gguf_dir)
    })
}

async fn hub_with_models(gated: bool) -> TestHub {
    let hub = TestHub::start().await;
    let (hf, gguf) = tiny_model();
    hub.publish("test-org/tiny-llama", hf, gated.then_some(TOKEN));
    hub.publish("test-org/tiny-gguf", gguf, None);
    hub
}

/// The environment that points inferd at `hub` with its own cache.
fn hub_env(hub: &TestHub, home: &Path) -> Vec<(String, String)> {
    vec![
        ("HF_ENDPOINT".into(), hub.url.clone()),
        ("HF_HOME".into(), home.to_string_lossy().into_owned()),
        ("HF_TOKEN".into(), String::new()),
    ]
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Runs `inferd ARGS` to its end (at most 120 s) off the async threads:
/// `(success, stdout, stderr)`.
async fn inferd(args: Vec<String>, env: Vec<(String, String)>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_inferd"))
            .current_dir(workspace())
            .args(&args)
            .env("INFERD_LOG", "info")
            .envs(env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(120);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > until {
                child.kill().unwrap();
                panic!("inferd {args:?} did not end within 120 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// `inferd serve` that is expected to fail before it serves.
async fn serve_fails(extra: &[&str], env: Vec<(String, String)>) -> String {
    let ledger = temp_dir("failing-ledger").join("usage.db");
    let mut a = args(&["serve", "--host", "127.0.0.1", "--port", "0", "--kv-cache-memory", "64MiB"]);
    a.extend(args(&["--ledger", ledger.to_str().unwrap()]));
    a.extend(args(extra));
    let (ok, stdout, stderr) = inferd(a, env).await;
    assert!(!ok, "inferd served: {stdout}");
    assert!(!stdout.contains("inferd listening"), "{stdout}");
    stderr
}

async fn start_server(extra: Vec<String>, env: Vec<(String, String)>) -> Server {
    tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        Server::start_with_env(&extra, &as_refs(&env))
    })
    .await
    .unwrap()
}

async fn complete(srv: &Server) -> Value {
    let resp = reqwest::Client::new()
        .post(srv.url("/v1/completions"))
        .json(&json!({"prompt": "Hello", "max_tokens": 5, "ignore_eos": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 5, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_download_from_the_hub_and_serve_from_the_cache_offline() {
    let hub = hub_with_models(false).await;
    let home = temp_dir("hf-home");
    let env = hub_env(&hub, &home);
    // A sharded safetensors repository.
    let srv = start_server(args(&["--model", "test-org/tiny-llama"]), env.clone()).await;
    let body = complete(&srv).await;
    assert_eq!(body["model"], "test-org/tiny-llama");
    drop(srv);
    let repo = home.join("hub/models--test-org--tiny-llama");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), COMMIT);
    let snapshot = repo.join("snapshots").join(COMMIT);
    for f in
        ["config.json", "tokenizer.json", "model.safetensors.index.json", "model-00002-of-00002.safetensors"]
    {
        assert!(snapshot.join(f).is_file(), "{f} is in the snapshot");
    }
    assert!(!snapshot.join("README.md").exists());
    // One GGUF file of a repository.
    let srv = start_server(args(&["--model", "test-org/tiny-gguf:tiny.gguf"]), env.clone()).await;
    complete(&srv).await;
    drop(srv);
    // Offline: the Hub is gone and nothing is asked of it.
    let before = hub.hub.requests.load(Ordering::SeqCst);
    let mut offline = env.clone();
    offline.push(("HF_HUB_OFFLINE".into(), "1".into()));
    let srv = start_server(args(&["--model", "test-org/tiny-llama"]), offline.clone()).await;
    complete(&srv).await;
    drop(srv);
    assert_eq!(hub.hub.requests.load(Ordering::SeqCst), before, "offline, the Hub saw no request");
    // Offline and not cached: a clear refusal.
    let err = serve_fails(&["--model", "test-org/not-cached"], offline).await;
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains("inferd models pull"), "{err}");
    // `models list` shows the cache; `models rm` empties it.
    let (ok, list, _) = inferd(args(&["models", "list"]), env.clone()).await;
    assert!(
        ok && list.contains("test-org/tiny-llama") && list.contains(&format!("{COMMIT} (main)")),
        "{list}"
    );
    let (ok, out, err) = inferd(args(&["models", "rm", "test-org/tiny-llama"]), env.clone()).await;
    assert!(ok, "{out}{err}");
    assert!(!repo.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_download_resumes_where_it_stopped() {
    let hub = hub_with_models(false).await;
    let home = temp_dir("hf-home-resume");
    let env = hub_env(&hub, &home);
    let gguf = std::fs::read(tiny_model().1.join("tiny.gguf")).unwrap();
    let (sha, len) = (sha256(&gguf), gguf.len() as u64);
    let pull = args(&["models", "pull", "test-org/tiny-gguf:tiny.gguf"]);
    // A process killed mid-download: the next run resumes from what it left.
    *hub.hub.slow.lock().unwrap() = Some(Duration::from_millis(20));
    let mut child = Command::new(env!("CARGO_BIN_EXE_inferd"))
        .current_dir(workspace())
        .args(&pull)
        .envs(env.clone())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while hub.served(&sha) < 4 << 20 {
        assert!(Instant::now() < until, "the download never reached 4 MiB");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    *hub.hub.slow.lock().unwrap() = None;
    let first = hub.served(&sha);
    let (ok, out, err) = inferd(pull.clone(), env.clone()).await;
    assert!(ok, "{out}{err}");
    let second = hub.served(&sha) - first;
    assert!(second + (3 << 20) <= len, "the second run fetched {second} of {len} bytes: it resumed");
    let cached = home.join("hub/models--test-org--tiny-gguf/snapshots").join(COMMIT).join("tiny.gguf");
    assert_eq!(sha256(&std::fs::read(&cached).unwrap()), sha, "the resumed file is whole");
    // A connection cut mid-file within one run: retried from where it broke.
    let (ok, out, err) = inferd(args(&["models", "rm", "test-org/tiny-gguf"]), env.clone()).await;
    assert!(ok, "{out}{err}");
    *hub.hub.cut.lock().unwrap() = Some((sha.clone(), hub.hub.ranges.lock().unwrap()[&sha] + 1));
    let before = hub.served(&sha);
    let (ok, out, err) = inferd(pull, env.clone()).await;
    assert!(ok, "{out}{err}");
    let fetched = hub.served(&sha) - before;
    assert!(
        fetched >= len && fetched < len + len / 8,
        "{fetched} bytes fetched for {len}: the cut half was kept"
    );
    assert_eq!(sha256(&std::fs::read(&cached).unwrap()), sha);
    // `models verify` checks the blob against the sha256 the Hub gave.
    let (ok, out, _) = inferd(args(&["models", "verify", "test-org/tiny-gguf"]), env.clone()).await;
    assert!(ok && out.contains("0 mismatch"), "{out}");
    let blob = std::fs::canonicalize(&cached).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let (ok, out, _) = inferd(args(&["models", "verify", "test-org/tiny-gguf"]), env).await;
    assert!(!ok && out.contains("MISMATCH") && out.contains("tiny.gguf"), "{out}");
}

/// A catalogue holding the default model and `extra`.
fn catalogue(dir: &Path, extra: &str) -> String {
    let default = std::fs::read_to_string(workspace().join("models/catalog.toml")).unwrap();
    let path = dir.join("catalog.toml");
    std::fs::write(&path, format!("{default}\n{extra}")).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue_pins_checksums_and_approved_only_serves_nothing_else() {
    let hub = hub_with_models(false).await;
    let dir = temp_dir("approved");
    let env = hub_env(&hub, &dir.join("hf-home"));
    // The approval flow: pin what the Hub serves, review it, add it.
    let (ok, pin, err) = inferd(
        args(&["models", "pin", "test-org/tiny-llama", "--name", "tiny", "--license", "Apache-2.0"]),
        env.clone(),
    )
    .await;
    assert!(ok, "{err}");
    assert!(pin.contains(COMMIT) && pin.contains("\"model-00001-of-00002.safetensors\" = "), "{pin}");
    let good = catalogue(&dir, &pin);
    let srv =
        start_server(args(&["--catalog", &good, "--approved-only", "--model", "tiny"]), env.clone()).await;
    complete(&srv).await;
    drop(srv);
    // The same repository named by the Hub is the catalogue's entry.
    let srv = start_server(
        args(&["--catalog", &good, "--approved-only", "--model", "test-org/tiny-llama"]),
        env.clone(),
    )
    .await;
    complete(&srv).await;
    drop(srv);
    // A file that differs from its pin is refused, approved-only or not.
    let tokenizer = sha256(&std::fs::read(tiny_model().0.join("tokenizer.json")).unwrap());
    let tampered = catalogue(&dir, &pin.replace(&tokenizer, &"0".repeat(64)));
    let err = serve_fails(&["--catalog", &tampered, "--model", "tiny"], env.clone()).await;
    assert!(err.contains("checksum mismatch") && err.contains("tokenizer.json"), "{err}");
    // Approved-only: not in the catalogue, a path, or an unpinned entry.
    let err = serve_fails(
        &["--catalog", &good, "--approved-only", "--model", "test-org/tiny-gguf:tiny.gguf"],
        env.clone(),
    )
    .await;
    assert!(err.contains("is not approved") && err.contains("no entry"), "{err}");
    let path = tiny_model().1.join("tiny.gguf");
    let err =
        serve_fails(&["--catalog", &good, "--approved-only", "--model", path.to_str().unwrap()], env.clone())
            .await;
    assert!(err.contains("a path is not a catalogue model"), "{err}");
    let err = serve_fails(
        &["--catalog", &good, "--approved-only", "--model", "qwen2.5-0.5b-instruct"],
        env.clone(),
    )
    .await;
    assert!(err.contains("not pinned"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_model_needs_the_token_which_is_sent_and_never_logged() {
    let hub = hub_with_models(true).await;
    let home = temp_dir("hf-home-gated");
    let env = hub_env(&hub, &home);
    let err = serve_fails(&["--model", "test-org/tiny-llama"], env.clone()).await;
    assert!(err.contains("gated or private") && err.contains("HF_TOKEN"), "{err}");
    let mut with_token: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k != "HF_TOKEN").collect();
    with_token.push(("HF_TOKEN".into(), TOKEN.into()));
    with_token.push(("INFERD_LOG".into(), "debug".into()));
    let log_path = home.join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let srv = tokio::task::spawn_blocking(move || {
        Server::start_logged(&["--model", "test-org/tiny-llama"], &as_refs(&with_token), log)
    })
    .await
    .unwrap();
    complete(&srv).await;
    drop(srv);
    assert!(hub.hub.with_token.load(Ordering::SeqCst) > 0, "the token went as a bearer header");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("tiny-llama") && !log.contains(TOKEN), "the log names the model, never the token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_reports_download_progress_while_loading() {
    let hub = hub_with_models(false).await;
    *hub.hub.slow.lock().unwrap() = Some(Duration::from_millis(40));
    let home = temp_dir("hf-home-progress");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_inferd"))
        .current_dir(workspace())
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--kv-cache-memory", "64MiB"])
        .args(["--model", "test-org/tiny-gguf:tiny.gguf"])
        .args(["--ledger", home.join("usage.db").to_str().unwrap()])
        .envs(hub_env(&hub, &home))
        .env("INFERD_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let (mut downloading, mut ready) = (None, false);
    let until = Instant::now() + Duration::from_secs(120);
    while Instant::now() < until && !ready {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(resp) = client.get(format!("{base}/ready")).send().await else { continue };
        let code = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or_default();
        if code == 503 && body["status"] == "loading" && body["progress"]["stage"] == "downloading" {
            let done = body["progress"]["file_bytes_done"].as_u64().unwrap_or(0);
            if done > 0 && downloading.is_none() {
                downloading = Some(body);
            }
        }
        ready = code == 200;
    }
    let _ = child.kill();
    let _ = child.wait();
    let seen = downloading.expect("/ready showed the download in progress");
    assert_eq!(seen["progress"]["file"], "tiny.gguf", "{seen}");
    assert!(
        seen["progress"]["file_bytes_total"].as_u64() > seen["progress"]["file_bytes_done"].as_u64(),
        "{seen}"
    );
    assert!(ready, "the server became ready once the download ended");
}

fn key_entry(tenant: &str, models: &str) -> String {
    let sha = sha256(format!("key-{tenant}").as_bytes());
    format!(
        "[[tenants]]\nid = \"{tenant}\"\nkeys = [{{ id = \"{tenant}-1\", sha256 = \"{sha}\" }}]\n{models}\n"
    )
}

async fn ask(srv: &Server, tenant: &str, model: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(srv.url("/v1/completions"))
        .bearer_auth(format!("key-{tenant}"))
        .json(&json!({"model": model, "prompt": "Hello", "max_tokens": 3, "ignore_eos": true}))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_models_serve_side_by_side_and_one_that_fails_harms_none() {
    let hub = hub_with_models(false).await;
    let dir = temp_dir("several");
    let env = hub_env(&hub, &dir.join("hf-home"));
    let config = dir.join("inferd.toml");
    let models = "[[models]]\nname = \"tiny\"\nmodel = \"test-org/tiny-gguf:tiny.gguf\"\nkv_cache_memory = \"64MiB\"\n\n\
                  [[models]]\nname = \"smol\"\nmodel = \"smollm2-135m-instruct\"\n\n\
                  [[models]]\nname = \"broken\"\nmodel = \"test-org/missing\"\n";
    let text = format!("{}{}{models}", key_entry("all", ""), key_entry("one", "models = [\"tiny\"]"));
    std::fs::write(&config, text).unwrap();
    let srv = start_server(args(&["--config", config.to_str().unwrap()]), env).await;
    // Requests go to the model they name, and say which answered.
    for model in ["tiny", "smol", "tiny"] {
        let (code, body) = ask(&srv, "all", model).await;
        assert_eq!((code, body["model"].as_str()), (200, Some(model)), "{body}");
    }
    let stats: Value = reqwest::get(srv.url("/stats")).await.unwrap().json().await.unwrap();
    assert_eq!(stats["models"]["tiny"]["generated_tokens"], 6, "{stats}");
    assert_eq!(stats["models"]["smol"]["generated_tokens"], 3, "{stats}");
    assert_eq!(stats["generated_tokens"], 9, "the top level sums the models");
    // The one that failed says why, and only its requests are refused.
    let (code, body) = ask(&srv, "all", "broken").await;
    assert_eq!(code, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("failed to load") && message.contains("no such repository"), "{body}");
    assert_eq!(ask(&srv, "all", "nope").await.0, 404);
    let ready = reqwest::get(srv.url("/ready")).await.unwrap();
    assert_eq!(ready.status(), 200, "the instance serves the models that loaded");
    let ready: Value = ready.json().await.unwrap();
    let status: Vec<(&str, &str)> = ready["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["status"].as_str().unwrap()))
        .collect();
    assert_eq!(status, [("tiny", "ready"), ("smol", "ready"), ("broken", "failed")], "{ready}");
    // Each tenant sees the models it may use.
    let list = |tenant: &'static str| {
        let url = srv.url("/v1/models");
        async move {
            let resp =
                reqwest::Client::new().get(url).bearer_auth(format!("key-{tenant}")).send().await.unwrap();
            let body: Value = resp.json().await.unwrap();
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list("all").await, ["tiny", "smol"]);
    assert_eq!(list("one").await, ["tiny"]);
    assert_eq!(ask(&srv, "one", "smol").await.0, 404, "a model the tenant may not use does not exist for it");
    assert_eq!(ask(&srv, "one", "tiny").await.0, 200);
    // Metrics and usage records carry the model.
    let metrics = reqwest::get(srv.url("/metrics")).await.unwrap().text().await.unwrap();
    for line in ["inferd_model_loaded{model=\"broken\"} 0", "inferd_model_loaded{model=\"tiny\"} 1"] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    assert!(
        metrics.lines().any(|l| l.starts_with("inferd_num_requests_running{model=\"smol\"}")),
        "{metrics}"
    );
    let ledger = rusqlite::Connection::open(&srv.ledger).unwrap();
    let mut q = ledger.prepare("SELECT model, count(*) FROM usage GROUP BY model ORDER BY model").unwrap();
    let rows: Vec<(String, i64)> =
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
    assert_eq!(rows, [("smol".to_string(), 1), ("tiny".to_string(), 3)]);
}
