//! The pretrained default model shipped with the project (`pipelines/models/deeppcb-compact`:
//! weights, network description, evaluation report and model card), built into `pcb` so
//! that `pcb up` and `pcb demo` have a useful model from the first board: when the registry
//! holds no version of the detector's model, the default is registered and made live.
//! Nothing is downloaded: the bytes are in the binary.

use pcb_registry::{publish_event, NewVersion, Registry};

/// The weights (safetensors, torchvision names).
pub const WEIGHTS: &[u8] = include_bytes!("../../models/deeppcb-compact/model.safetensors");
/// The network (`pcb_vision::ModelConfig` as JSON).
pub const CONFIG: &str = include_str!("../../models/deeppcb-compact/model.json");
/// `pcb eval`'s report on DeepPCB's val.txt (`pcb_evaluation::Report` as JSON).
pub const REPORT: &str = include_str!("../../models/deeppcb-compact/eval.json");
/// Where the model card lives in the repository.
pub const CARD: &str = "pipelines/models/deeppcb-compact/MODEL_CARD.md";

/// The network the default was trained as.
pub fn config() -> anyhow::Result<pcb_vision::ModelConfig> {
    Ok(serde_json::from_str(CONFIG)?)
}

/// Registers the default as `name`'s first version and makes it live, unless the registry
/// already holds a version of `name` (a user's model is never replaced). Returns the
/// version registered, `None` when there was one already.
pub async fn register_if_empty(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> anyhow::Result<Option<u64>> {
    let registry = Registry::open(js).await?;
    if !registry.list(Some(name)).await?.is_empty() {
        return Ok(None);
    }
    let metrics: serde_json::Value = serde_json::from_str(REPORT)?;
    let v = registry
        .register(
            name,
            WEIGHTS,
            NewVersion {
                model_config: serde_json::from_str(CONFIG)?,
                metrics: Some(metrics),
                hyperparameters: serde_json::json!({ "pretrained": CARD }),
                snapshot: None,
                job: None,
                origin: "pretrained".into(),
                git_revision: None,
            },
        )
        .await?;
    publish_event(
        js,
        pcb_schemas::ModelEventKind::Registered,
        name,
        v.version,
        "pcb",
        Some(format!("the shipped default ({CARD})")),
    )
    .await;
    registry.promote(name, v.version, "pcb").await?;
    publish_event(
        js,
        pcb_schemas::ModelEventKind::Promoted,
        name,
        v.version,
        "pcb",
        Some("first version: the shipped default".into()),
    )
    .await;
    Ok(Some(v.version))
}

/// One line on the default for a terminal: its val mAP on both scales and its size.
pub fn summary() -> String {
    let report: Option<pcb_evaluation::Report> = serde_json::from_str(REPORT).ok();
    let scores = report
        .map(|r| {
            format!(
                "val mAP {:.2}%, DeepPCB script AP {:.2}%",
                100.0 * r.map_deeppcb.unwrap_or(f64::NAN),
                100.0 * r.official_all.ap
            )
        })
        .unwrap_or_else(|| "no report".into());
    format!(
        "DeepPCB compact default ({scores}, {:.1} MB; {CARD})",
        WEIGHTS.len() as f64 / 1e6
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_default_loads_fits_its_description_and_is_small() {
        let cfg = config().expect("model.json parses");
        let mut det = pcb_vision::Detector::new(cfg, tch::Device::Cpu, pcb_vision::Sampling::First);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, WEIGHTS).expect("write");
        det.load(&path).expect("the weights fit the description");
        assert!(WEIGHTS.len() <= 10_000_000, "{} bytes", WEIGHTS.len());
        let report: pcb_evaluation::Report = serde_json::from_str(REPORT).expect("report parses");
        assert_eq!(report.images, 250, "evaluated on the whole of val.txt");
        assert!(summary().contains("val mAP"), "{}", summary());
    }
}
