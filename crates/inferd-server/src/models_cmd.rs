//! `inferd models pull|list|verify|rm|pin`: the Hugging Face cache and the
//! approved catalogue from the command line.

use std::sync::Arc;

use anyhow::Context;
use inferd_models::catalog::{Catalog, CatalogEntry, sha256_file};
use inferd_models::hub::{self, HubConfig, HubSpec, LoadProgress};

use crate::args::ModelsCommand;

/// Runs one `inferd models` command; the process exit code.
pub async fn run(cmd: ModelsCommand) -> anyhow::Result<i32> {
    match cmd {
        ModelsCommand::Pull { models, catalog } => {
            let sources = catalog.sources(false);
            for m in models {
                let progress = Arc::new(LoadProgress::default());
                let resolved = sources.resolve(&m, &progress).await?;
                let verified = if resolved.entry.is_some() { " (checksums verified)" } else { "" };
                println!("{m}: {}{verified}", resolved.path.display());
            }
            Ok(0)
        }
        ModelsCommand::List { catalog } => {
            let cfg = HubConfig::from_env();
            println!("cache {}:", cfg.cache_dir.display());
            for r in hub::list_cache(&cfg) {
                let partial = if r.partial > 0 {
                    format!(", {} partial download(s)", r.partial)
                } else {
                    String::new()
                };
                println!("  {}  {:.1} MiB{partial}", r.repo, r.size as f64 / (1 << 20) as f64);
                for (commit, refs) in r.snapshots {
                    let named =
                        if refs.is_empty() { String::new() } else { format!(" ({})", refs.join(", ")) };
                    println!("    {commit}{named}");
                }
            }
            let cat = catalog.sources(false).catalog()?;
            println!("catalogue {}:", catalog.catalog.display());
            for e in &cat.models {
                let pinned = match e.pinned() {
                    Ok(()) => "pinned".to_string(),
                    Err(why) => format!("not pinned: {why}"),
                };
                println!(
                    "  {}  {}  {}  [{pinned}]  {}",
                    e.name,
                    source_text(e),
                    e.license,
                    downloaded(e, &cfg, &catalog.models_dir)
                );
            }
            Ok(0)
        }
        ModelsCommand::Verify { models, catalog } => {
            let cfg = HubConfig::from_env();
            let cat = catalog.sources(false).catalog()?;
            let specs: Vec<HubSpec> = if models.is_empty() {
                hub::list_cache(&cfg)
                    .into_iter()
                    .map(|r| HubSpec { repo: r.repo, revision: None, file: None })
                    .collect()
            } else {
                models.iter().map(|m| to_spec(m, &cat)).collect::<anyhow::Result<_>>()?
            };
            let (mut checked, mut bad) = (0, 0);
            for spec in specs {
                let (c, b) = verify_repo(&cfg, &cat, &spec)?;
                (checked, bad) = (checked + c, bad + b);
            }
            println!("{checked} file(s) checked, {bad} mismatch(es)");
            Ok(if bad > 0 || (checked == 0 && !models.is_empty()) { 1 } else { 0 })
        }
        ModelsCommand::Rm { models } => {
            let cfg = HubConfig::from_env();
            for m in models {
                let spec = HubSpec::parse(&m).with_context(|| format!("{m} is not org/name[@revision]"))?;
                println!("{}", hub::remove(&cfg, &spec)?);
            }
            Ok(0)
        }
        ModelsCommand::Pin { model, name, license } => {
            let cfg = HubConfig::from_env();
            let spec = HubSpec::parse(&model)
                .with_context(|| format!("{model} is not org/name[@revision][:file]"))?;
            let progress = Arc::new(LoadProgress::default());
            let fetched = hub::fetch(&spec, &cfg, &progress, None).await?;
            let mut files = Vec::new();
            for f in &fetched.files {
                let path = fetched.dir.join(f);
                let sum = tokio::task::spawn_blocking(move || sha256_file(&path)).await??;
                files.push((f.clone(), sum));
            }
            print!("{}", pin_entry(&spec, &fetched.commit, &name, &license, &files));
            Ok(0)
        }
    }
}

/// A catalogue entry pinning `spec` at `commit`, in the catalogue's TOML.
fn pin_entry(spec: &HubSpec, commit: &str, name: &str, license: &str, files: &[(String, String)]) -> String {
    let q = |s: &str| toml_quote(s);
    let format = if spec.file.is_some() { "gguf" } else { "safetensors" };
    let file = spec.file.as_deref().map(|f| format!(", file = {}", q(f))).unwrap_or_default();
    let mut out = format!(
        "\n[[model]]\nname = {}\nformat = \"{format}\"\nlicense = {}\nsource = {{ hugging_face = {{ repo = {}, revision = \"{commit}\"{file} }} }}\n[model.files]\n",
        q(name),
        q(license),
        q(&spec.repo)
    );
    for (f, sum) in files {
        out.push_str(&format!("{} = \"{sum}\"\n", q(f)));
    }
    out
}

fn toml_quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn source_text(e: &CatalogEntry) -> String {
    match e.hub_spec() {
        Some(spec) => format!("hub {spec}"),
        None => match &e.source {
            inferd_models::catalog::ModelSource::Pip { package, .. } => format!("pip {package}"),
            inferd_models::catalog::ModelSource::Path { path } => format!("path {path}"),
            inferd_models::catalog::ModelSource::HuggingFace { .. } => unreachable!("handled above"),
        },
    }
}

fn downloaded(e: &CatalogEntry, cfg: &HubConfig, models_dir: &std::path::Path) -> &'static str {
    let there = match e.hub_spec() {
        Some(spec) => cfg.cached_commit(&spec).is_some(),
        None => e.file.as_ref().is_some_and(|f| models_dir.join(f).exists()),
    };
    if there { "downloaded" } else { "not downloaded" }
}

/// A catalogue name or org/name[@revision] as the repository to verify.
fn to_spec(m: &str, cat: &Catalog) -> anyhow::Result<HubSpec> {
    if let Ok(entry) = cat.get(m) {
        return entry.hub_spec().with_context(|| format!("catalogue entry {m} is not a Hub model"));
    }
    HubSpec::parse(m).with_context(|| format!("{m} is neither a catalogue name nor org/name[@revision]"))
}

/// Checks every file of the snapshots of `spec` (or the one its revision
/// names); `(files checked, mismatches)`.
fn verify_repo(cfg: &HubConfig, cat: &Catalog, spec: &HubSpec) -> anyhow::Result<(usize, usize)> {
    let snapshots = cfg.repo_dir(&spec.repo).join("snapshots");
    let commits: Vec<String> = match &spec.revision {
        Some(_) => cfg.cached_commit(spec).into_iter().collect(),
        None => std::fs::read_dir(&snapshots)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
    };
    anyhow::ensure!(!commits.is_empty(), "{spec} is not in the cache ({})", cfg.cache_dir.display());
    let (mut checked, mut bad) = (0, 0);
    for commit in commits {
        let dir = snapshots.join(&commit);
        let at = HubSpec { repo: spec.repo.clone(), revision: Some(commit.clone()), file: None };
        let pins = cat
            .models
            .iter()
            .filter(|e| e.hub_spec().is_some_and(|s| s.repo == at.repo && s.revision == at.revision));
        let pins: Vec<(String, String)> =
            pins.flat_map(|e| e.files.iter().map(|(f, s)| (f.clone(), s.clone()))).collect();
        for file in hub::snapshot_files(&dir) {
            let path = dir.join(&file);
            let mut expected: Vec<(&str, String)> =
                pins.iter().filter(|(f, _)| *f == file).map(|(_, s)| ("catalogue", s.clone())).collect();
            if let Some(lfs) = hub::lfs_sha256(&path) {
                expected.push(("hub", lfs));
            }
            if expected.is_empty() {
                continue;
            }
            let actual = sha256_file(&path)?;
            checked += 1;
            for (what, want) in expected {
                if !want.eq_ignore_ascii_case(&actual) {
                    bad += 1;
                    println!(
                        "MISMATCH {}@{commit} {file}: {what} says sha256 {want}, file has {actual}",
                        spec.repo
                    );
                }
            }
        }
        for (f, _) in pins.iter().filter(|(f, _)| !dir.join(f).exists()) {
            bad += 1;
            println!("MISSING {}@{commit} {f}: pinned by the catalogue, not in the cache", spec.repo);
        }
        println!("{}@{commit}: checked", spec.repo);
    }
    Ok((checked, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_entry_is_a_catalogue_entry_that_pins() {
        let spec = HubSpec::parse("org/m:w.Q8_0.gguf").unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let sum = "a".repeat(64);
        let text = pin_entry(&spec, commit, "m-q8", "Apache-2.0", &[("w.Q8_0.gguf".into(), sum.clone())]);
        let cat: Catalog = toml::from_str(&text).unwrap();
        let e = cat.get("m-q8").unwrap();
        assert!(e.pinned().is_ok(), "{text}");
        assert_eq!(e.files["w.Q8_0.gguf"], sum);
        assert_eq!(e.hub_spec().unwrap().to_string(), format!("org/m@{commit}:w.Q8_0.gguf"));
        assert_eq!(cat.find_hub(&HubSpec::parse("org/m:w.Q8_0.gguf").unwrap()).unwrap().name, "m-q8");
        assert!(
            cat.find_hub(&HubSpec::parse("org/m").unwrap()).is_none(),
            "the GGUF entry is not the repository's safetensors"
        );
    }
}
