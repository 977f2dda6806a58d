//! `pcb models`: list, show, promote, roll back, shadow, canary, import and export (safetensors or
//! ONNX) registry versions.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use pcb_registry::{parse_ref, publish_event, NewVersion, Registry};

/// `pcb models` subcommands.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum ModelsCmd {
    /// Every version with its metrics; `*` marks the live one, `~` the shadow one, `+` the
    /// canary.
    List {
        /// Only this model.
        name: Option<String>,
    },
    /// One version in full (NAME@VERSION, or NAME / NAME@live for the live one).
    Show {
        /// The version.
        reference: String,
    },
    /// Make NAME@VERSION the live version (detectors swap to it).
    Promote {
        /// The version.
        reference: String,
    },
    /// Return NAME's live alias to the version before it.
    Rollback {
        /// The model.
        name: String,
    },
    /// Run NAME@VERSION beside the live version on the same images (detectors publish its
    /// answers on `pcb.shadow.detections`, never on `pcb.detections` nor to the lines).
    Shadow {
        /// The version.
        reference: String,
    },
    /// End NAME's shadow period: detectors stop running its shadow version.
    Unshadow {
        /// The model.
        name: String,
    },
    /// Let NAME@VERSION answer a share of the boards (by a hash of the board id, so a board
    /// always goes to the same version) or one line's, in place of the live version: its
    /// answers are real (on `pcb.detections`, verdicts to the line).
    Canary {
        /// The version.
        reference: String,
        /// The share of boards it answers (above 0, at most 1).
        #[arg(long, conflicts_with = "line", required_unless_present = "line")]
        share: Option<f64>,
        /// The line whose boards it answers.
        #[arg(long)]
        line: Option<String>,
    },
    /// End NAME's canary: its boards go back to the live version.
    Uncanary {
        /// The model.
        name: String,
    },
    /// Register a safetensors file (torchvision key names) as a new version.
    Import {
        /// The weights.
        file: PathBuf,
        /// Model name.
        #[arg(long, default_value = "pcb-defects")]
        name: String,
        /// The network's description (model.json as `pcb train --data` writes it); default:
        /// model.json beside the file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// An evaluation report (`pcb eval --report`) to store with it.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Make it live at once.
        #[arg(long)]
        promote: bool,
    },
    /// Write a version's weights (checked against its sha256) and its model.json, or with
    /// `--format onnx` an ONNX graph of it (pipelines/export/onnx_export.py, run by a Python
    /// with torch).
    Export {
        /// The version.
        reference: String,
        /// Output file: the safetensors (model.json goes beside it), or the .onnx.
        #[arg(long)]
        out: PathBuf,
        /// What to write.
        #[arg(long, value_enum, default_value_t = ExportFormat::Safetensors)]
        format: ExportFormat,
        /// For `--format onnx`: a Python with torch, torchvision, onnx and safetensors
        /// (deploy/requirements-bench.txt).
        #[arg(
            long,
            env = "PCB_EXPORT_PYTHON",
            default_value = ".venv-bench/bin/python"
        )]
        python: PathBuf,
    },
}

/// What `pcb models export` writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// The weights as registered (torchvision key names) and model.json beside them.
    Safetensors,
    /// An ONNX graph taking the grey board (and template), giving boxes, labels, scores.
    Onnx,
}

/// The exporter, built in so that `pcb` exports from any directory.
const ONNX_EXPORT_PY: &str = include_str!("../../export/onnx_export.py");

/// Writes `weights` (safetensors) with `model_config` to `out` as ONNX: both go to a
/// temporary folder, where `python` runs pipelines/export/onnx_export.py on them.
pub fn export_onnx(
    weights: &[u8],
    model_config: &serde_json::Value,
    out: &Path,
    python: &Path,
) -> anyhow::Result<()> {
    // Ask for the imports first: a traceback from deep inside the script would hide that
    // the Python is simply the wrong one.
    let probe = Command::new(python)
        .args(["-c", "import torch, torchvision, onnx, safetensors"])
        .output();
    let why = match probe {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .to_string(),
        ),
        Err(e) => Some(e.to_string()),
    };
    if let Some(why) = why {
        bail!(
            "{} cannot export to ONNX ({why}): it needs torch, torchvision, onnx and safetensors \
             from deploy/requirements-bench.txt (python3 -m venv .venv-bench && \
             .venv-bench/bin/pip install -r deploy/requirements-bench.txt), then pass it with \
             --python or PCB_EXPORT_PYTHON",
            python.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let (script, w, json) = (
        dir.path().join("onnx_export.py"),
        dir.path().join("model.safetensors"),
        dir.path().join("model.json"),
    );
    std::fs::write(&script, ONNX_EXPORT_PY)?;
    std::fs::write(&w, weights)?;
    std::fs::write(&json, serde_json::to_string_pretty(model_config)?)?;
    let status = Command::new(python)
        .arg(&script)
        .arg("--weights")
        .arg(&w)
        .arg("--config")
        .arg(&json)
        .arg("--out")
        .arg(out)
        .status()
        .with_context(|| format!("running {}", python.display()))?;
    if !status.success() {
        bail!(
            "onnx_export.py failed ({status}); nothing usable in {}",
            out.display()
        );
    }
    Ok(())
}

/// Runs a `pcb models` command against the pipeline `w` finds.
pub async fn run(w: &crate::reach::Where, cmd: ModelsCmd) -> anyhow::Result<()> {
    let client = crate::reach::resolve(w)?.connect("pcb-models").await?;
    let js = async_nats::jetstream::new(client);
    let registry = Registry::open(&js).await?;
    let registry_ref = &registry;
    let resolve = |reference: String| async move {
        let registry = registry_ref;
        let (name, version) = parse_ref(&reference)?;
        let version = match version {
            Some(v) => v,
            None => registry
                .live(&name)
                .await?
                .map(|l| l.version)
                .with_context(|| format!("{name} has no live version"))?,
        };
        anyhow::Ok((name, version))
    };
    match cmd {
        ModelsCmd::List { name } => {
            let versions = registry.list(name.as_deref()).await?;
            if versions.is_empty() {
                println!("no model registered yet");
                return Ok(());
            }
            println!(
                "{:<2}{:<24}{:>8}  {:<20}{:>10}{:>10}  {:<10}job",
                "", "model", "version", "created", "mAP", "mAP@0.5", "origin"
            );
            for v in versions {
                let live = registry.live(&v.name).await?.map(|l| l.version);
                let shadow = registry.shadow(&v.name).await?.map(|s| s.version);
                let canary = registry.canary(&v.name).await?.map(|c| c.version);
                let pct = |x: Option<f64>| {
                    x.map(|m| format!("{:.2}%", m * 100.0))
                        .unwrap_or("-".into())
                };
                println!(
                    "{:<2}{:<24}{:>8}  {:<20}{:>10}{:>10}  {:<10}{}",
                    if live == Some(v.version) {
                        "*"
                    } else if shadow == Some(v.version) {
                        "~"
                    } else if canary == Some(v.version) {
                        "+"
                    } else {
                        ""
                    },
                    v.name,
                    v.version,
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH
                            + Duration::from_millis(v.created_at_ms.max(0) as u64)
                    ),
                    pct(v.map_deeppcb),
                    pct(v.map50),
                    v.origin,
                    v.job.unwrap_or_default()
                );
            }
        }
        ModelsCmd::Show { reference } => {
            let (name, version) = resolve(reference).await?;
            let v = registry.version(&name, version).await?;
            let live = registry.live(&name).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            if let Some(l) = live {
                println!("live: {name}@{} (earlier: {:?})", l.version, l.history);
            }
            if let Some(s) = registry.shadow(&name).await? {
                println!("shadow: {name}@{} (set by {})", s.version, s.by);
            }
            if let Some(c) = registry.canary(&name).await? {
                println!(
                    "canary: {name}@{} for {} (set by {})",
                    c.version, c.rule, c.by
                );
            }
        }
        ModelsCmd::Promote { reference } => {
            let (name, version) = resolve(reference).await?;
            let alias = registry.promote(&name, version, "cli").await?;
            publish_event(
                &js,
                pcb_schemas::ModelEventKind::Promoted,
                &name,
                version,
                "cli",
                Some("by hand".into()),
            )
            .await;
            println!(
                "{name}@{} is live (earlier: {:?})",
                alias.version, alias.history
            );
        }
        ModelsCmd::Rollback { name } => {
            let alias = registry.rollback(&name, "cli").await?;
            publish_event(
                &js,
                pcb_schemas::ModelEventKind::RolledBack,
                &name,
                alias.version,
                "cli",
                None,
            )
            .await;
            println!("{name}@{} is live again", alias.version);
        }
        ModelsCmd::Shadow { reference } => {
            let (name, version) = parse_ref(&reference)?;
            let version = version.with_context(|| {
                format!("name the version to shadow: {name}@VERSION (the live one cannot be)")
            })?;
            registry.set_shadow(&name, version, "cli").await?;
            publish_event(
                &js,
                pcb_schemas::ModelEventKind::Shadowed,
                &name,
                version,
                "cli",
                None,
            )
            .await;
            println!("{name}@{version} runs in shadow beside the live version");
        }
        ModelsCmd::Unshadow { name } => match registry.clear_shadow(&name).await? {
            Some(old) => {
                publish_event(
                    &js,
                    pcb_schemas::ModelEventKind::Unshadowed,
                    &name,
                    old.version,
                    "cli",
                    None,
                )
                .await;
                println!("{name}@{} no longer runs in shadow", old.version);
            }
            None => println!("{name} has no shadow version"),
        },
        ModelsCmd::Canary {
            reference,
            share,
            line,
        } => {
            let (name, version) = parse_ref(&reference)?;
            let version = version.with_context(|| {
                format!("name the canary version: {name}@VERSION (the live one cannot be)")
            })?;
            let rule = match (share, line) {
                (Some(share), None) => pcb_registry::CanaryRule::Share { share },
                (None, Some(line)) => pcb_registry::CanaryRule::Line { line },
                _ => bail!("give either --share or --line"),
            };
            let alias = registry.set_canary(&name, version, rule, "cli").await?;
            publish_event(
                &js,
                pcb_schemas::ModelEventKind::Canaried,
                &name,
                version,
                "cli",
                Some(format!("for {}", alias.rule)),
            )
            .await;
            println!(
                "{name}@{version} answers {} in place of the live version",
                alias.rule
            );
        }
        ModelsCmd::Uncanary { name } => match registry.clear_canary(&name).await? {
            Some(old) => {
                publish_event(
                    &js,
                    pcb_schemas::ModelEventKind::Uncanaried,
                    &name,
                    old.version,
                    "cli",
                    None,
                )
                .await;
                println!(
                    "{name}@{} no longer answers as a canary: its boards go to the live version",
                    old.version
                );
            }
            None => println!("{name} has no canary version"),
        },
        ModelsCmd::Import {
            file,
            name,
            config,
            report,
            promote,
        } => {
            let weights =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let config_path = config.unwrap_or_else(|| file.with_file_name("model.json"));
            let text = std::fs::read_to_string(&config_path).with_context(|| {
                format!(
                    "reading the network's description {} (pass --config)",
                    config_path.display()
                )
            })?;
            let model_config: pcb_vision::ModelConfig = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a model description", config_path.display()))?;
            // Refuse weights that do not fit the description now, not in every detector.
            let tmp = file.clone();
            let cfg = model_config.clone();
            tokio::task::spawn_blocking(move || {
                let mut det =
                    pcb_vision::Detector::new(cfg, tch::Device::Cpu, pcb_vision::Sampling::Random);
                det.load(&tmp)
            })
            .await??;
            let metrics = match report {
                Some(p) => Some(
                    serde_json::from_str(&std::fs::read_to_string(&p)?)
                        .with_context(|| format!("{} is not a JSON report", p.display()))?,
                ),
                None => None,
            };
            let v = registry
                .register(
                    &name,
                    &weights,
                    NewVersion {
                        model_config: serde_json::to_value(&model_config)?,
                        metrics,
                        hyperparameters: serde_json::json!({"imported_from": file.display().to_string()}),
                        snapshot: None,
                        job: None,
                        origin: "import".into(),
                        git_revision: None,
                    },
                )
                .await?;
            publish_event(
                &js,
                pcb_schemas::ModelEventKind::Registered,
                &name,
                v.version,
                "cli",
                Some(format!("imported {}", file.display())),
            )
            .await;
            println!("registered {name}@{} (sha256 {})", v.version, v.sha256);
            if promote {
                registry.promote(&name, v.version, "cli").await?;
                publish_event(
                    &js,
                    pcb_schemas::ModelEventKind::Promoted,
                    &name,
                    v.version,
                    "cli",
                    Some("import --promote".into()),
                )
                .await;
                println!("{name}@{} is live", v.version);
            }
        }
        ModelsCmd::Export {
            reference,
            out,
            format,
            python,
        } => {
            let (name, version) = resolve(reference).await?;
            let v = registry.version(&name, version).await?;
            let weights = registry.weights(&v).await?;
            if format == ExportFormat::Onnx {
                let (target, config) = (out.clone(), v.model_config.clone());
                tokio::task::spawn_blocking(move || {
                    export_onnx(&weights, &config, &target, &python)
                })
                .await??;
                println!(
                    "{name}@{version}: ONNX graph in {} (sha256 of the weights verified)",
                    out.display()
                );
                return Ok(());
            }
            let json = out.with_file_name("model.json");
            if json.exists() {
                bail!("{} exists; export into an empty folder", json.display());
            }
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&out, &weights)?;
            std::fs::write(&json, serde_json::to_string_pretty(&v.model_config)?)?;
            println!(
                "{name}@{version}: {} bytes to {} (sha256 verified), network in {}",
                weights.len(),
                out.display(),
                json.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onnx_export_without_torch_says_what_to_install() {
        let e = export_onnx(
            b"",
            &serde_json::json!({}),
            Path::new("/nonexistent/m.onnx"),
            Path::new("/nonexistent/python"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("deploy/requirements-bench.txt"), "{e}");
        assert!(e.contains("/nonexistent/python"), "{e}");
    }
}
