//! Tenants and their API keys, from the `--config` TOML file. Keys are
//! stored only as SHA-256 hashes; a presented key is hashed and compared
//! with every stored hash in constant time.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::limits::{Limiter, LimitsConfig};

/// Why a request's credentials were refused (answered 401); `code` is the
/// OpenAI error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthError {
    pub message: &'static str,
    pub code: &'static str,
}

/// The tenant every request belongs to when none are configured.
pub const DEFAULT_TENANT: &str = "default";

/// The `tenant` label of refusals made before a tenant is known.
pub const UNAUTHENTICATED: &str = "unauthenticated";

/// Errors reading the config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: String, source: Box<toml::de::Error> },
    #[error("{0}")]
    Invalid(String),
}

/// The config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// The models to serve (`[[models]]`), when not given by `--model`;
    /// read at start only, not on reload.
    #[serde(default)]
    pub models: Vec<ModelEntry>,
}

/// One `[[models]]` entry: a model with its own engine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// What `--model` takes: a catalogue name, a path or a Hub repository.
    pub model: String,
    /// The name clients send in `model`; defaults to `model`.
    pub name: Option<String>,
    /// This model's KV cache budget (`--kv-cache-memory` when absent).
    pub kv_cache_memory: Option<String>,
    /// This model's most concurrent sequences (`--max-num-seqs` when absent).
    pub max_num_seqs: Option<usize>,
}

/// One `[[tenants]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: String,
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Models it may use; empty means all.
    #[serde(default)]
    pub models: Vec<String>,
    /// Higher runs first when requests wait for the engine.
    #[serde(default)]
    pub priority: i32,
    /// Sees every tenant's usage.
    #[serde(default)]
    pub admin: bool,
    /// Store prompts and completions (redacted) in the ledger.
    #[serde(default)]
    pub log_prompts: bool,
}

/// One API key: an id for records and logs, and the key's SHA-256 in hex.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub id: String,
    pub sha256: String,
}

/// A configured tenant with its live limits.
#[derive(Debug)]
pub struct Tenant {
    pub id: Arc<str>,
    pub models: Vec<String>,
    pub priority: i32,
    pub admin: bool,
    pub log_prompts: bool,
    pub limiter: Arc<Limiter>,
}

impl Tenant {
    /// Whether this tenant may use `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

/// Who made a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: Arc<Tenant>,
    /// The key's id from the config; `None` in open mode.
    pub key_id: Option<Arc<str>>,
}

#[derive(Debug)]
struct StoredKey {
    id: Arc<str>,
    hash: [u8; 32],
    tenant: usize,
}

/// Every tenant and key; open (one unlimited `default` tenant, no keys)
/// when the config lists none.
#[derive(Debug)]
pub struct Tenants {
    tenants: Vec<Arc<Tenant>>,
    keys: Vec<StoredKey>,
}

/// SHA-256 of a key, in lower-case hex: what the config stores.
pub fn hash_key(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A fresh random API key.
pub fn new_key() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("sk-inferd-{}", hex(&bytes))
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.display().to_string(), source: Box::new(e) })
    }
}

impl Tenants {
    /// Builds the tenants; `used` gives each tenant's tokens already spent
    /// this UTC day and month (from the ledger).
    pub fn new(
        config: &ConfigFile,
        used: &HashMap<String, (u64, u64)>,
        unix: i64,
    ) -> Result<Self, ConfigError> {
        Self::build(config, used, unix, None)
    }

    /// The tenants of a re-read config. A tenant whose limits did not
    /// change keeps its live limiter (buckets, quota counts, requests in
    /// flight); others start from `used`.
    pub fn reload(
        &self,
        config: &ConfigFile,
        used: &HashMap<String, (u64, u64)>,
        unix: i64,
    ) -> Result<Self, ConfigError> {
        Self::build(config, used, unix, Some(self))
    }

    fn limiter(
        old: Option<&Tenants>,
        id: &str,
        limits: &LimitsConfig,
        used: &HashMap<String, (u64, u64)>,
        unix: i64,
    ) -> Arc<Limiter> {
        match old.and_then(|o| o.get(id)).filter(|t| t.limiter.config() == limits) {
            Some(t) => t.limiter.clone(),
            None => {
                let (day, month) = used.get(id).copied().unwrap_or((0, 0));
                Limiter::new(limits.clone(), day, month, unix)
            }
        }
    }

    fn build(
        config: &ConfigFile,
        used: &HashMap<String, (u64, u64)>,
        unix: i64,
        old: Option<&Tenants>,
    ) -> Result<Self, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if config.tenants.is_empty() {
            let tenant = Tenant {
                id: DEFAULT_TENANT.into(),
                models: Vec::new(),
                priority: 0,
                admin: true,
                log_prompts: false,
                limiter: Self::limiter(old, DEFAULT_TENANT, &LimitsConfig::default(), used, unix),
            };
            return Ok(Tenants { tenants: vec![Arc::new(tenant)], keys: Vec::new() });
        }
        let mut ids = HashSet::new();
        let mut key_ids = HashSet::new();
        let mut hashes = HashSet::new();
        let mut tenants = Vec::new();
        let mut keys = Vec::new();
        for (i, t) in config.tenants.iter().enumerate() {
            if !valid_id(&t.id) || t.id == UNAUTHENTICATED {
                return bad(format!(
                    "tenant id {:?} must be 1-64 of [A-Za-z0-9._-] and not {UNAUTHENTICATED:?}",
                    t.id
                ));
            }
            if !ids.insert(t.id.clone()) {
                return bad(format!("tenant {:?} is listed twice", t.id));
            }
            if t.keys.is_empty() {
                return bad(format!("tenant {:?} has no keys", t.id));
            }
            for k in &t.keys {
                if !valid_id(&k.id) || !key_ids.insert(k.id.clone()) {
                    return bad(format!("key id {:?} must be unique and 1-64 of [A-Za-z0-9._-]", k.id));
                }
                let Some(hash) = parse_hex32(&k.sha256.to_ascii_lowercase()) else {
                    return bad(format!(
                        "key {:?}: sha256 must be 64 hex digits (make one with `inferd keys hash`)",
                        k.id
                    ));
                };
                if !hashes.insert(hash) {
                    return bad(format!("key {:?} has the same hash as another key", k.id));
                }
                keys.push(StoredKey { id: k.id.as_str().into(), hash, tenant: i });
            }
            tenants.push(Arc::new(Tenant {
                id: t.id.as_str().into(),
                models: t.models.clone(),
                priority: t.priority,
                admin: t.admin,
                log_prompts: t.log_prompts,
                limiter: Self::limiter(old, &t.id, &t.limits, used, unix),
            }));
        }
        Ok(Tenants { tenants, keys })
    }

    /// Checks every tenant's rate limits and quotas against the fleet's
    /// shared store from now on (concurrency caps stay per instance).
    pub fn share_limits(
        &self,
        store: &crate::shared_limits::SharedLimits,
        on_failure: crate::limits::StoreFailure,
    ) {
        for t in &self.tenants {
            t.limiter.share(store.clone(), t.id.clone(), on_failure);
        }
    }

    /// True when no tenants are configured: no keys needed.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn all(&self) -> &[Arc<Tenant>] {
        &self.tenants
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.tenants.iter().find(|t| &*t.id == id)
    }

    /// The caller an `Authorization` header's value (`Bearer <key>`) names;
    /// `None` when the header is missing, `Err(())` inside when it is not
    /// text.
    pub fn authenticate(&self, authorization: Option<Result<&str, ()>>) -> Result<Caller, AuthError> {
        if self.is_open() {
            return Ok(Caller { tenant: self.tenants[0].clone(), key_id: None });
        }
        let value = authorization.ok_or(AuthError {
            message: "Missing API key: send it as `Authorization: Bearer <key>`.",
            code: "missing_api_key",
        })?;
        let key = value
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(AuthError {
                message: "Malformed Authorization header: expected `Bearer <key>`.",
                code: "invalid_api_key",
            })?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // Compare with every key, without stopping at a match.
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.hash.ct_eq(&digest)) {
                found = Some(k);
            }
        }
        let k = found.ok_or(AuthError { message: "Incorrect API key provided.", code: "invalid_api_key" })?;
        Ok(Caller { tenant: self.tenants[k.tenant].clone(), key_id: Some(k.id.clone()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[[tenants]]
id = "acme"
priority = 5
models = ["smollm2-135m-instruct"]
keys = [{ id = "acme-1", sha256 = "HASH" }]
[tenants.limits]
requests_per_minute = 60
tokens_per_day = 1000

[[tenants]]
id = "ops"
admin = true
keys = [{ id = "ops-1", sha256 = "HASH2" }]
"#;

    fn sample() -> Tenants {
        let text = SAMPLE.replace("HASH2", &hash_key("key-ops")).replace("HASH", &hash_key("key-acme"));
        let cfg: ConfigFile = toml::from_str(&text).unwrap();
        Tenants::new(&cfg, &HashMap::new(), crate::clock::now_unix()).unwrap()
    }

    fn bearer(v: &str) -> Option<Result<&str, ()>> {
        Some(Ok(v))
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(hash_key("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(new_key().starts_with("sk-inferd-"));
        assert_ne!(new_key(), new_key());
    }

    #[test]
    fn keys_map_to_their_tenant_and_bad_keys_are_refused() {
        let t = sample();
        let c = t.authenticate(bearer("Bearer key-acme")).unwrap();
        assert_eq!(&*c.tenant.id, "acme");
        assert_eq!(c.key_id.as_deref(), Some("acme-1"));
        assert_eq!(c.tenant.priority, 5);
        assert!(!c.tenant.may_use("other") && c.tenant.may_use("smollm2-135m-instruct"));
        assert!(t.authenticate(bearer("Bearer key-ops")).unwrap().tenant.admin);
        for bad in ["Bearer nope", "Basic a2V5LWFjbWU=", "Bearer ", "key-acme"] {
            assert_eq!(t.authenticate(bearer(bad)).map(|_| ()).unwrap_err().code, "invalid_api_key", "{bad}");
        }
        assert_eq!(t.authenticate(None).map(|_| ()).unwrap_err().code, "missing_api_key");
        assert_eq!(t.authenticate(Some(Err(()))).map(|_| ()).unwrap_err().code, "invalid_api_key");
    }

    #[test]
    fn the_readme_sample_config_is_valid() {
        let readme = include_str!("../../../README.md");
        let mut text = readme
            .split("```toml\n")
            .skip(1)
            .filter_map(|block| block.split("```").next())
            .find(|block| block.contains("[[tenants]]"))
            .expect("README has a TOML sample of tenants")
            .to_string();
        let mut n = 0;
        while let Some(at) = text.find("\"<") {
            let end = at + text[at..].find(">\"").expect("placeholder closes") + 2;
            n += 1;
            text.replace_range(at..end, &format!("\"{}\"", hash_key(&format!("key-{n}"))));
        }
        let cfg: ConfigFile = toml::from_str(&text).expect("the sample parses");
        let t = Tenants::new(&cfg, &HashMap::new(), 0).expect("the sample is valid");
        assert_eq!(t.all().len(), 2);
        let search = t.get("search-team").unwrap();
        assert_eq!(search.limiter.config().tokens_per_minute, Some(200_000));
        assert!(t.get("finance").unwrap().admin);
    }

    #[test]
    fn reload_keeps_live_limits_of_unchanged_tenants_and_applies_new_keys() {
        let config = |a_key: &str, b_rpm: u32| -> ConfigFile {
            toml::from_str(&format!(
                "[[tenants]]\nid = \"a\"\nkeys = [{{id = \"a1\", sha256 = \"{}\"}}]\nlimits = {{requests_per_minute = 1}}\n\
                 [[tenants]]\nid = \"b\"\nkeys = [{{id = \"b1\", sha256 = \"{}\"}}]\nlimits = {{requests_per_minute = {b_rpm}}}\n",
                hash_key(a_key),
                hash_key("kb"),
            ))
            .unwrap()
        };
        let old = Tenants::new(&config("ka", 1), &HashMap::new(), 0).unwrap();
        for t in old.all() {
            t.limiter.admit(1).unwrap().settle(1);
        }
        // a: a new key, same limits; b: a higher limit.
        let new = old.reload(&config("ka2", 5), &HashMap::new(), 0).unwrap();
        assert!(new.authenticate(bearer("Bearer ka")).is_err(), "the old key is gone");
        let a = new.authenticate(bearer("Bearer ka2")).unwrap().tenant;
        assert!(a.limiter.admit(1).is_err(), "a's bucket, spent before the reload, is still spent");
        assert!(new.get("b").unwrap().limiter.admit(1).is_ok(), "b has new, higher limits");
    }

    #[test]
    fn open_mode_has_one_default_tenant() {
        let t = Tenants::new(&ConfigFile::default(), &HashMap::new(), 0).unwrap();
        assert!(t.is_open());
        assert_eq!(&*t.authenticate(None).unwrap().tenant.id, DEFAULT_TENANT);
    }

    #[test]
    fn invalid_configs_are_clear_errors() {
        let h = hash_key("k");
        for (cfg, expect) in [
            (format!("[[tenants]]\nid = \"a b\"\nkeys = [{{id = \"k\", sha256 = \"{h}\"}}]"), "tenant id"),
            ("[[tenants]]\nid = \"a\"".to_string(), "has no keys"),
            ("[[tenants]]\nid = \"a\"\nkeys = [{id = \"k\", sha256 = \"xyz\"}]".to_string(), "64 hex"),
            (
                format!(
                    "[[tenants]]\nid = \"a\"\nkeys = [{{id = \"k\", sha256 = \"{h}\"}}]\n[[tenants]]\nid = \"a\"\nkeys = [{{id = \"k2\", sha256 = \"{h}\"}}]"
                ),
                "twice",
            ),
        ] {
            let parsed: ConfigFile = toml::from_str(&cfg).unwrap();
            let err = Tenants::new(&parsed, &HashMap::new(), 0).unwrap_err().to_string();
            assert!(err.contains(expect), "{err}");
        }
        assert!(toml::from_str::<ConfigFile>("[[tenants]]\nid = \"a\"\nkeyz = []").is_err());
    }
}
