//! Turns `--model` into files on disk: a path, a catalogue name, or a Hub
//! repository; downloads what is missing, verifies what the catalogue pins,
//! and with `--approved-only` refuses anything the catalogue does not.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::catalog::{Catalog, CatalogEntry};
use crate::error::{ModelError, Result};
use crate::hub::{self, HubConfig, HubSpec, LoadProgress};

/// Where models may come from.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The catalogue file; a missing file is an empty catalogue.
    pub catalog: PathBuf,
    /// Where pip and path entries' files are.
    pub models_dir: PathBuf,
    pub hub: HubConfig,
    /// Serve only pinned catalogue entries whose files match.
    pub approved_only: bool,
}

/// A model resolved to disk.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// What the loader opens: a GGUF file or a model folder.
    pub path: PathBuf,
    /// The catalogue entry it came from, if any.
    pub entry: Option<String>,
}

fn not_approved(spec: &str, reason: impl Into<String>) -> ModelError {
    ModelError::NotApproved { spec: spec.into(), reason: reason.into() }
}

impl Sources {
    /// The catalogue; an absent file is an empty one.
    pub fn catalog(&self) -> Result<Catalog> {
        if self.catalog.exists() { Catalog::load(&self.catalog) } else { Ok(Catalog::default()) }
    }

    /// Resolves `spec`: an existing path, then a catalogue name, then
    /// `org/name[@revision][:file]` of the Hub.
    pub async fn resolve(&self, spec: &str, progress: &Arc<LoadProgress>) -> Result<Resolved> {
        let catalog = self.catalog()?;
        if Path::new(spec).exists() {
            if self.approved_only {
                return Err(not_approved(
                    spec,
                    format!("a path is not a catalogue model; name one of: {}", catalog.names()),
                ));
            }
            return Ok(Resolved { path: spec.into(), entry: None });
        }
        if let Ok(entry) = catalog.get(spec) {
            return self.resolve_entry(spec, entry, progress).await;
        }
        let Some(hub_spec) = HubSpec::parse(spec) else {
            return Err(ModelError::UnknownModel { name: spec.into(), known: catalog.names() });
        };
        match catalog.find_hub(&hub_spec) {
            Some(entry) => self.resolve_entry(spec, entry, progress).await,
            None if self.approved_only => Err(not_approved(
                spec,
                format!(
                    "the catalogue ({}) has no entry for it; approved: {}",
                    self.catalog.display(),
                    catalog.names()
                ),
            )),
            None => {
                let fetched = hub::fetch(&hub_spec, &self.hub, progress, None).await?;
                tracing::warn!(
                    model = %hub_spec,
                    commit = %fetched.commit,
                    "not in the catalogue: its files are not checked against pinned checksums"
                );
                Ok(Resolved { path: fetched.path, entry: None })
            }
        }
    }

    async fn resolve_entry(
        &self,
        spec: &str,
        entry: &CatalogEntry,
        progress: &Arc<LoadProgress>,
    ) -> Result<Resolved> {
        if self.approved_only {
            entry.pinned().map_err(|why| {
                not_approved(
                    spec,
                    format!(
                        "catalogue entry {:?} is not pinned: {why} (`inferd models pin` prints the pins to review and add)",
                        entry.name
                    ),
                )
            })?;
        }
        let name = entry.name.clone();
        let path = match entry.hub_spec() {
            Some(hub_spec) => {
                let pinned: Vec<String> = entry.files.keys().cloned().collect();
                let pinned = (!pinned.is_empty()).then_some(pinned.as_slice());
                let fetched = hub::fetch(&hub_spec, &self.hub, progress, pinned).await?;
                progress.stage(spec, "verifying");
                let (entry, dir) = (entry.clone(), fetched.dir.clone());
                blocking(move || entry.verify_files(&dir)).await?;
                fetched.path
            }
            None => {
                progress.stage(spec, "verifying");
                let (entry, dir) = (entry.clone(), self.models_dir.clone());
                blocking(move || entry.verified_path(&dir)).await?
            }
        };
        Ok(Resolved { path, entry: Some(name) })
    }
}

/// Runs checksum work (seconds for a large model) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ModelError::Io { path: PathBuf::new(), source: std::io::Error::other(e.to_string()) })
    })
}
