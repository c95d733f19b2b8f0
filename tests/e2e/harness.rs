//! Starts the real `inferd` binary on 127.0.0.1 with port 0 and the real
//! default model, and reads its bound address from the ready line.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::Duration;

/// Pids of servers still running; killed when the test process exits, since
/// servers shared through statics are never dropped.
static PIDS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static ATEXIT: AtomicI32 = AtomicI32::new(0);

extern "C" fn kill_servers() {
    if let Ok(pids) = PIDS.lock() {
        for &pid in pids.iter() {
            // SAFETY: kill(2) on a pid we spawned; no memory is touched.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn register(pid: i32) {
    if ATEXIT.swap(1, Ordering::SeqCst) == 0 {
        // SAFETY: registers a plain extern "C" function with no captured state.
        unsafe {
            libc::atexit(kill_servers);
        }
    }
    if let Ok(mut pids) = PIDS.lock() {
        pids.push(pid);
    }
}

/// A running server, killed when dropped.
pub struct Server {
    child: Child,
    pub base: String,
    /// Its usage ledger (a fresh file per server unless `--ledger` was given).
    pub ledger: PathBuf,
}

/// A fresh, empty folder for one test's files.
pub fn temp_dir(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("inferd-e2e-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl Server {
    /// Starts `inferd serve` with extra flags.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_with_env(extra, &[])
    }

    /// Starts `inferd serve` with extra flags and environment variables,
    /// and waits for its ready line.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::spawn(extra, env, Stdio::inherit())
    }

    /// Like [`Server::start_with_env`], with the server's log (stderr) written to `log`.
    pub fn start_logged(extra: &[&str], env: &[(&str, &str)], log: std::fs::File) -> Server {
        Self::spawn(extra, env, Stdio::from(log))
    }

    fn spawn(extra: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Server {
        let root = workspace();
        let ledger = match extra.iter().position(|a| *a == "--ledger") {
            Some(i) => PathBuf::from(extra[i + 1]),
            None => temp_dir("ledger").join("usage.db"),
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_inferd"));
        cmd.current_dir(&root)
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--kv-cache-memory", "256MiB"])
            .args(["--threads", "2"])
            .args(if extra.contains(&"--max-model-len") { vec![] } else { vec!["--max-model-len", "2048"] })
            .args(if extra.contains(&"--ledger") {
                vec![]
            } else {
                vec!["--ledger", ledger.to_str().unwrap_or_default()]
            })
            .args(extra)
            .env("INFERD_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd.spawn().expect("inferd starts");
        register(child.id() as i32);
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("inferd listening on ") {
                    let url = rest.split_whitespace().next().unwrap_or_default().to_string();
                    let _ = tx.send(url);
                }
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("inferd printed no ready line within 120 s");
            }
        };
        Server { child, base, ledger }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a Unix signal to the server.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the child we spawned.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits up to `limit` for the server to exit; its status if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + limit;
        while std::time::Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls /stats until the engine holds no blocks and runs nothing (at most
/// 5 s: a step can be slow on a loaded test machine); returns the last stats.
pub async fn wait_idle(srv: &Server) -> serde_json::Value {
    let mut stats = serde_json::Value::Null;
    for _ in 0..100 {
        let resp = reqwest::get(srv.url("/stats")).await.expect("stats answers");
        stats = resp.json().await.expect("stats is JSON");
        if stats["kv_blocks_used"] == 0
            && stats["num_requests_running"] == 0
            && stats["num_requests_waiting"] == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stats
}

/// Polls /stats until `done` holds (at most 30 s, for a loaded machine);
/// returns those stats. Tests order events by this, not by sleeping.
pub async fn wait_for_stats(
    srv: &Server,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats: serde_json::Value = reqwest::get(srv.url("/stats"))
            .await
            .expect("stats answers")
            .json()
            .await
            .expect("stats is JSON");
        if done(&stats) {
            return stats;
        }
        assert!(std::time::Instant::now() < until, "never {what}: {stats}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
