//! Models from the Hugging Face Hub, or a mirror of it, through the
//! `hf-hub` crate: the standard cache layout (`HF_HOME`, `HF_HUB_CACHE`),
//! `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE`, resumable downloads, and
//! progress for a terminal, the logs and `/ready`.
//!
//! The cache is the one `huggingface_hub` writes: under
//! `models--{org}--{name}/`, `blobs/` holds each file once by its ETag (an
//! LFS file's is its sha256), `snapshots/{commit}/` links every file of a
//! commit to its blob, and `refs/{branch}` names a branch's commit.

use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hf_hub::api::Progress;
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use serde::Serialize;

use crate::error::{ModelError, Result};

/// `org/name[@revision][:file]`: a repository of the Hub, a branch, tag or
/// commit of it (`main` when absent), and for a GGUF model the one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    pub repo: String,
    pub revision: Option<String>,
    pub file: Option<String>,
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(['.', '-'])
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// A relative path inside a repository: no empty, `.` or `..` parts.
fn is_repo_path(s: &str) -> bool {
    !s.is_empty() && s.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
}

impl HubSpec {
    /// Parses `org/name[@revision][:file]`; `None` when `spec` is not one.
    pub fn parse(spec: &str) -> Option<HubSpec> {
        let (left, file) = match spec.split_once(':') {
            Some((l, f)) => (l, Some(f.to_string())),
            None => (spec, None),
        };
        let (repo, revision) = match left.split_once('@') {
            Some((r, rev)) => (r, Some(rev.to_string())),
            None => (left, None),
        };
        let (org, name) = repo.split_once('/')?;
        let ok = is_name(org)
            && is_name(name)
            && revision.as_deref().is_none_or(is_repo_path)
            && file.as_deref().is_none_or(is_repo_path);
        ok.then(|| HubSpec { repo: repo.to_string(), revision, file })
    }

    /// The revision asked for: `main` unless given.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

impl fmt::Display for HubSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.repo)?;
        if let Some(rev) = &self.revision {
            write!(f, "@{rev}")?;
        }
        if let Some(file) = &self.file {
            write!(f, ":{file}")?;
        }
        Ok(())
    }
}

/// Whether `rev` is a full commit hash.
pub fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Where the Hub is and how to talk to it, from the standard variables.
#[derive(Clone)]
pub struct HubConfig {
    /// `HF_ENDPOINT`, without a trailing slash.
    pub endpoint: String,
    /// `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// `HF_TOKEN`, else the token file; never printed.
    token: Option<String>,
    /// `HF_HUB_OFFLINE`: the cache only, no request at all.
    pub offline: bool,
}

impl fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .finish()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl HubConfig {
    /// Reads `HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN` (or
    /// `HF_TOKEN_PATH`, or the token file `huggingface-cli login` writes),
    /// and `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let home = env("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(env("HOME").unwrap_or_else(|| "/".into())).join(".cache/huggingface")
        });
        let cache_dir = env("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| home.join("hub"));
        let token_file = env("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| home.join("token"));
        let token = env("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(token_file).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        let offline = env("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        HubConfig {
            endpoint: env("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .into(),
            cache_dir,
            token,
            offline,
        }
    }

    /// Whether a token will be sent.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The cache folder of one repository.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache_dir.join(format!("models--{}", repo.replace('/', "--")))
    }

    /// The commit `spec`'s revision names in the cache, if it is there.
    pub fn cached_commit(&self, spec: &HubSpec) -> Option<String> {
        let dir = self.repo_dir(&spec.repo);
        let rev = spec.revision();
        if is_commit(rev) && dir.join("snapshots").join(rev).is_dir() {
            return Some(rev.to_string());
        }
        let commit = std::fs::read_to_string(dir.join("refs").join(rev)).ok()?;
        let commit = commit.trim();
        (is_commit(commit) && dir.join("snapshots").join(commit).is_dir()).then(|| commit.to_string())
    }
}

/// A model in the cache: its commit, snapshot folder and files.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub commit: String,
    /// `snapshots/{commit}`.
    pub dir: PathBuf,
    /// The files the model is made of, as paths in the repository.
    pub files: Vec<String>,
    /// What the loader opens: the snapshot folder, or the GGUF file in it.
    pub path: PathBuf,
}

impl Fetched {
    fn new(spec: &HubSpec, commit: String, dir: PathBuf, files: Vec<String>) -> Self {
        let path = match &spec.file {
            Some(f) => dir.join(f),
            None => dir.clone(),
        };
        Fetched { commit, dir, files, path }
    }
}

/// How far loading has got, for `/ready` and the logs.
#[derive(Debug, Default)]
pub struct LoadProgress {
    state: Mutex<ProgressState>,
}

/// A snapshot of [`LoadProgress`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProgressState {
    /// `resolving`, `downloading`, `verifying` or `loading`.
    pub stage: &'static str,
    pub model: String,
    /// The file being downloaded or checked.
    pub file: Option<String>,
    pub files_done: usize,
    pub files_total: usize,
    pub file_bytes_done: u64,
    pub file_bytes_total: u64,
    /// Bytes received from the network since the start.
    pub bytes_downloaded: u64,
    #[serde(skip)]
    last_log: Option<Instant>,
}

/// How often download progress is logged when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

impl LoadProgress {
    pub fn snapshot(&self) -> ProgressState {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProgressState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters a stage of loading `model`.
    pub fn stage(&self, model: &str, stage: &'static str) {
        let mut s = self.lock();
        s.stage = stage;
        s.model = model.to_string();
        s.file = None;
    }

    fn files(&self, done: usize, total: usize) {
        let mut s = self.lock();
        (s.files_done, s.files_total) = (done, total);
    }

    fn start_file(&self, file: &str, size: u64) {
        let mut s = self.lock();
        s.file = Some(file.to_string());
        (s.file_bytes_done, s.file_bytes_total) = (0, size);
    }

    /// `n` bytes of the current file are on disk; `fresh` when they came
    /// from the network now (not from an earlier, interrupted download).
    fn advance(&self, n: u64, fresh: bool) {
        let mut s = self.lock();
        s.file_bytes_done += n;
        if fresh {
            s.bytes_downloaded += n;
        }
        let due = s.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY);
        if due && !std::io::stderr().is_terminal() {
            s.last_log = Some(Instant::now());
            let pct = (s.file_bytes_done * 100).checked_div(s.file_bytes_total).unwrap_or(100);
            tracing::info!(
                model = %s.model,
                file = s.file.as_deref().unwrap_or_default(),
                percent = pct,
                mib = s.file_bytes_done >> 20,
                of_mib = s.file_bytes_total >> 20,
                "downloading"
            );
        }
    }
}

/// hf-hub's progress callbacks: the shared [`LoadProgress`], and a bar when
/// stderr is a terminal. Each attempt at a file calls `init`, then
/// `update` with what earlier attempts left on disk, then with each read.
struct Reporter {
    shared: Arc<LoadProgress>,
    bar: Option<indicatif::ProgressBar>,
    /// The next update is what an earlier attempt left.
    resumed: bool,
}

impl Progress for Reporter {
    fn init(&mut self, size: usize, filename: &str) {
        self.shared.start_file(filename, size as u64);
        self.resumed = true;
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(size as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            ) {
                bar.set_style(style);
            }
            bar.set_message(filename.to_string());
            self.bar = Some(bar);
        }
    }

    fn update(&mut self, size: usize) {
        let fresh = !std::mem::replace(&mut self.resumed, false);
        self.shared.advance(size as u64, fresh);
        if let Some(bar) = &self.bar {
            bar.inc(size as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

fn hub_err(spec: &HubSpec, reason: impl Into<String>) -> ModelError {
    ModelError::Hub { spec: spec.to_string(), reason: reason.into() }
}

/// What went wrong talking to the Hub, in words an operator can act on.
fn explain(e: &ApiError, cfg: &HubConfig) -> String {
    let e = match e {
        ApiError::TooManyRetries(inner) => inner,
        e => e,
    };
    match e {
        ApiError::RequestError(r) => match &**r {
            ureq::Error::StatusCode(401 | 403) if cfg.has_token() => {
                "the Hub refused the token in HF_TOKEN (a gated model whose terms this account has not accepted, or a token without access)".into()
            }
            ureq::Error::StatusCode(401 | 403) => {
                "the repository is gated or private: set HF_TOKEN to a token with access".into()
            }
            ureq::Error::StatusCode(404) => "no such repository, revision or file on the Hub".into(),
            _ if is_unreachable(e) => format!(
                "cannot reach the Hub at {} ({r}); set HF_ENDPOINT to a reachable mirror, or HF_HUB_OFFLINE=1 to use the cache only",
                cfg.endpoint
            ),
            _ => e.to_string(),
        },
        _ => e.to_string(),
    }
}

fn is_unreachable(e: &ApiError) -> bool {
    matches!(e, ApiError::RequestError(r) if matches!(
        &**r,
        ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound | ureq::Error::Timeout(_)
    ))
}

/// The files of a safetensors model among a repository's: config,
/// tokenizer, and the weights (one file, or the shard index whose shards
/// follow once it is read).
fn model_files(spec: &HubSpec, siblings: &[String]) -> Result<Vec<String>> {
    let has = |f: &str| siblings.iter().any(|s| s == f);
    if let Some(file) = &spec.file {
        if has(file) {
            return Ok(vec![file.clone()]);
        }
        let ggufs: Vec<&str> = siblings.iter().map(String::as_str).filter(|s| s.ends_with(".gguf")).collect();
        return Err(hub_err(
            spec,
            format!("no file {file} in the repository (its GGUF files: {})", ggufs.join(", ")),
        ));
    }
    let mut files = Vec::new();
    for f in ["config.json", "tokenizer.json"] {
        if !has(f) {
            return Err(hub_err(spec, format!("the repository has no {f}, which a safetensors model needs")));
        }
        files.push(f.to_string());
    }
    for f in ["tokenizer_config.json", "generation_config.json", "special_tokens_map.json"] {
        if has(f) {
            files.push(f.to_string());
        }
    }
    if has("model.safetensors") {
        files.push("model.safetensors".into());
    } else if has("model.safetensors.index.json") {
        files.push("model.safetensors.index.json".into());
    } else {
        let ggufs: Vec<&str> = siblings.iter().map(String::as_str).filter(|s| s.ends_with(".gguf")).collect();
        let hint = if ggufs.is_empty() {
            String::new()
        } else {
            format!("; to serve one of its GGUF files, name it: {}:{}", spec.repo, ggufs[0])
        };
        return Err(hub_err(spec, format!("the repository has no safetensors weights{hint}")));
    }
    Ok(files)
}

/// Downloads what `spec` names into the cache (files already there are not
/// fetched again; a file an earlier run left half-done resumes where it
/// stopped) and returns it. `pinned`: exactly these files, at a revision
/// the caller pins, instead of what the repository lists. With
/// `HF_HUB_OFFLINE`, or when the Hub cannot be reached and the cache has
/// the revision, the cache alone answers.
pub async fn fetch(
    spec: &HubSpec,
    cfg: &HubConfig,
    progress: &Arc<LoadProgress>,
    pinned: Option<&[String]>,
) -> Result<Fetched> {
    progress.stage(&spec.to_string(), "resolving");
    if cfg.offline {
        return from_cache(spec, cfg, pinned).ok_or_else(|| {
            hub_err(
                spec,
                format!(
                    "HF_HUB_OFFLINE is set and the cache ({}) does not hold it; run `inferd models pull {spec}` where the Hub is reachable, or copy the cache folder here",
                    cfg.cache_dir.display()
                ),
            )
        });
    }
    let (spec2, cfg2, progress2) = (spec.clone(), cfg.clone(), progress.clone());
    let pinned = pinned.map(<[String]>::to_vec);
    tokio::task::spawn_blocking(move || download(&spec2, &cfg2, &progress2, pinned.as_deref()))
        .await
        .map_err(|e| hub_err(spec, e.to_string()))?
}

/// How many times one file's download is retried within a run, each
/// attempt resuming where the last stopped (`INFERD_HUB_RETRIES`).
fn retries() -> usize {
    env("INFERD_HUB_RETRIES").and_then(|v| v.parse().ok()).unwrap_or(3)
}

/// [`fetch`]'s network part, on a blocking thread.
fn download(
    spec: &HubSpec,
    cfg: &HubConfig,
    progress: &Arc<LoadProgress>,
    pinned: Option<&[String]>,
) -> Result<Fetched> {
    let name = spec.to_string();
    let api = ApiBuilder::from_cache(Cache::new(cfg.cache_dir.clone()))
        .with_endpoint(cfg.endpoint.clone())
        .with_token(cfg.token.clone())
        .with_progress(false)
        .with_retries(retries())
        .build()
        .map_err(|e| hub_err(spec, e.to_string()))?;
    let (commit, mut files) = match pinned {
        Some(files) if is_commit(spec.revision()) => (spec.revision().to_string(), files.to_vec()),
        _ => {
            let repo =
                api.repo(Repo::with_revision(spec.repo.clone(), RepoType::Model, spec.revision().into()));
            match repo.info() {
                Ok(info) => {
                    let siblings: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
                    let files = match pinned {
                        Some(files) => files.to_vec(),
                        None => model_files(spec, &siblings)?,
                    };
                    (info.sha, files)
                }
                Err(e) if is_unreachable(&e) => {
                    if let Some(cached) = from_cache(spec, cfg, pinned) {
                        tracing::warn!(model = %spec, error = %explain(&e, cfg), "the Hub is unreachable; serving the cached revision");
                        return Ok(cached);
                    }
                    return Err(hub_err(spec, explain(&e, cfg)));
                }
                Err(e) => return Err(hub_err(spec, explain(&e, cfg))),
            }
        }
    };
    if !is_commit(&commit) {
        return Err(hub_err(spec, format!("the Hub answered commit {commit:?}, not a commit hash")));
    }
    let at = api.repo(Repo::with_revision(spec.repo.clone(), RepoType::Model, commit.clone()));
    let dir = cfg.repo_dir(&spec.repo).join("snapshots").join(&commit);
    progress.stage(&name, "downloading");
    let mut i = 0;
    while i < files.len() {
        progress.files(i, files.len());
        let file = files[i].clone();
        if !dir.join(&file).exists() {
            let reporter = Reporter { shared: progress.clone(), bar: None, resumed: true };
            at.download_with_progress(&file, reporter)
                .map_err(|e| hub_err(spec, format!("downloading {file}: {}", explain(&e, cfg))))?;
            tracing::info!(model = %spec, file, "downloaded");
        }
        if file == "model.safetensors.index.json" && pinned.is_none() {
            for shard in crate::hf::shard_names(&dir.join(&file))? {
                if !files.contains(&shard) {
                    files.push(shard);
                }
            }
        }
        i += 1;
    }
    progress.files(files.len(), files.len());
    // A branch or tag now names this commit, so the cache answers it offline.
    if !is_commit(spec.revision()) {
        let refs = cfg.repo_dir(&spec.repo).join("refs").join(spec.revision());
        let io = |source| ModelError::Io { path: refs.clone(), source };
        std::fs::create_dir_all(refs.parent().unwrap_or(&refs)).map_err(io)?;
        std::fs::write(&refs, &commit).map_err(io)?;
    }
    Ok(Fetched::new(spec, commit, dir, files))
}

/// The cached snapshot `spec` names, if every file it needs is there.
fn from_cache(spec: &HubSpec, cfg: &HubConfig, pinned: Option<&[String]>) -> Option<Fetched> {
    let commit = cfg.cached_commit(spec)?;
    let dir = cfg.repo_dir(&spec.repo).join("snapshots").join(&commit);
    let files = match (pinned, &spec.file) {
        (Some(files), _) => files.to_vec(),
        (None, Some(file)) => vec![file.clone()],
        (None, None) => snapshot_files(&dir),
    };
    let complete = files.iter().all(|f| dir.join(f).is_file())
        && (spec.file.is_some() || dir.join("config.json").is_file());
    complete.then(|| Fetched::new(spec, commit, dir, files))
}

/// Every file of a snapshot folder, as paths relative to it, sorted.
pub fn snapshot_files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// One repository in the cache, for `inferd models list`.
#[derive(Debug, Clone)]
pub struct CachedRepo {
    pub repo: String,
    /// `(commit, the refs that name it)`.
    pub snapshots: Vec<(String, Vec<String>)>,
    /// Bytes of its blobs.
    pub size: u64,
    /// Downloads that were interrupted and will resume.
    pub partial: usize,
}

/// The model repositories in the cache, sorted by name.
pub fn list_cache(cfg: &HubConfig) -> Vec<CachedRepo> {
    let Ok(entries) = std::fs::read_dir(&cfg.cache_dir) else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix("models--") else { continue };
        let repo = id.replacen("--", "/", 1);
        let dir = e.path();
        let refs = dir.join("refs");
        let named: Vec<(String, String)> = snapshot_files(&refs)
            .into_iter()
            .filter_map(|r| Some((std::fs::read_to_string(refs.join(&r)).ok()?.trim().to_string(), r)))
            .collect();
        let mut snapshots: Vec<(String, Vec<String>)> = std::fs::read_dir(dir.join("snapshots"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|s| {
                let commit = s.file_name().to_string_lossy().into_owned();
                let names =
                    named.iter().filter(|(c, r)| *c == commit && *r != commit).map(|(_, r)| r.clone());
                (commit.clone(), names.collect())
            })
            .collect();
        snapshots.sort();
        let (mut size, mut partial) = (0, 0);
        for b in std::fs::read_dir(dir.join("blobs")).into_iter().flatten().flatten() {
            let n = b.file_name().to_string_lossy().into_owned();
            if n.ends_with(".sync.part") {
                partial += 1;
            } else if !n.ends_with(".lock") {
                size += b.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
        out.push(CachedRepo { repo, snapshots, size, partial });
    }
    out.sort_by(|a, b| a.repo.cmp(&b.repo));
    out
}

/// Removes a repository from the cache, or with a revision only that
/// snapshot (and the blobs no other snapshot uses). Returns what went.
pub fn remove(cfg: &HubConfig, spec: &HubSpec) -> Result<String> {
    let dir = cfg.repo_dir(&spec.repo);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    if !dir.exists() {
        return Err(hub_err(spec, format!("not in the cache ({})", cfg.cache_dir.display())));
    }
    if spec.revision.is_none() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        return Ok(format!("removed {} ({})", spec.repo, dir.display()));
    }
    let commit = cfg.cached_commit(spec).ok_or_else(|| hub_err(spec, "that revision is not in the cache"))?;
    let snap = dir.join("snapshots").join(&commit);
    std::fs::remove_dir_all(&snap).map_err(io(&snap))?;
    let refs = dir.join("refs");
    for r in snapshot_files(&refs) {
        if std::fs::read_to_string(refs.join(&r)).is_ok_and(|c| c.trim() == commit) {
            std::fs::remove_file(refs.join(&r)).map_err(io(&refs.join(&r)))?;
        }
    }
    // Blobs still linked from another snapshot stay.
    let snapshots = dir.join("snapshots");
    let mut used = std::collections::BTreeSet::new();
    for s in std::fs::read_dir(&snapshots).into_iter().flatten().flatten() {
        for f in snapshot_files(&s.path()) {
            if let Ok(target) = std::fs::canonicalize(s.path().join(f)) {
                used.insert(target);
            }
        }
    }
    for b in std::fs::read_dir(dir.join("blobs")).into_iter().flatten().flatten() {
        let keep = std::fs::canonicalize(b.path()).is_ok_and(|p| used.contains(&p));
        if !keep {
            std::fs::remove_file(b.path()).map_err(io(&b.path()))?;
        }
    }
    Ok(format!("removed {}@{commit}", spec.repo))
}

/// The blob a snapshot file links to, when its name is an LFS sha256 (the
/// Hub's ETag of a large file), for `inferd models verify`.
pub fn lfs_sha256(snapshot_file: &Path) -> Option<String> {
    let target = std::fs::canonicalize(snapshot_file).ok()?;
    let name = target.file_name()?.to_str()?;
    (name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())).then(|| name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_specs_parse_and_print_back() {
        let s = HubSpec::parse("Qwen/Qwen2.5-0.5B-Instruct").unwrap();
        assert_eq!(
            (s.repo.as_str(), s.revision(), s.file.as_deref()),
            ("Qwen/Qwen2.5-0.5B-Instruct", "main", None)
        );
        let s = HubSpec::parse("org/name@refs/pr/1:sub/m.Q4_0.gguf").unwrap();
        assert_eq!(s.revision.as_deref(), Some("refs/pr/1"));
        assert_eq!(s.file.as_deref(), Some("sub/m.Q4_0.gguf"));
        assert_eq!(s.to_string(), "org/name@refs/pr/1:sub/m.Q4_0.gguf");
        for bad in [
            "smollm2-135m-instruct",
            "./a/b",
            "a/b/c",
            "/abs/path",
            "a/",
            "a/b:",
            "a/b@",
            "a/b:../x",
            "a/b@x/../y",
            "-a/b",
        ] {
            assert_eq!(HubSpec::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_token_never_prints() {
        let cfg = HubConfig {
            endpoint: "http://127.0.0.1:1".into(),
            cache_dir: "/tmp/x".into(),
            token: Some("hf_secret_value".into()),
            offline: false,
        };
        let text = format!("{cfg:?}");
        assert!(!text.contains("hf_secret_value") && text.contains("<set>"), "{text}");
    }

    #[test]
    fn a_safetensors_repository_needs_config_tokenizer_and_weights() {
        let spec = HubSpec::parse("o/m").unwrap();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let files = model_files(
            &spec,
            &names(&["README.md", "config.json", "tokenizer.json", "model.safetensors.index.json", "m.gguf"]),
        )
        .unwrap();
        assert_eq!(files, ["config.json", "tokenizer.json", "model.safetensors.index.json"]);
        let err = model_files(&spec, &names(&["config.json", "tokenizer.json", "m.Q8_0.gguf"])).unwrap_err();
        assert!(err.to_string().contains("o/m:m.Q8_0.gguf"), "{err}");
        let gguf = HubSpec::parse("o/m:x.gguf").unwrap();
        let err = model_files(&gguf, &names(&["y.gguf"])).unwrap_err().to_string();
        assert!(err.contains("no file x.gguf") && err.contains("y.gguf"), "{err}");
    }
}
