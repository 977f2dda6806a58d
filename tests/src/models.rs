//! Helpers for the tests of model versions (shadow, canary, the detector's reloads): the
//! `pcb models` command as the admin identity, the registry's events, the viewer's Models
//! API and the answers on `pcb.detections`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use pcb_common::Identity;
use pcb_schemas::{decode, Detection, ModelEvent, STREAM_TRAINING};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{bin, Env};

/// `GET path` on an HTTP server (the viewer, a stage's `/metrics`); the status and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    pcb::bench_viewer::parse_response(&raw)
}

/// A pipeline file for `pcb models` on a secured [`Env`]: its server, and the identities
/// the harness made (the command connects as the admin).
pub fn admin_pipeline(env: &Env) -> PathBuf {
    let ids = env.identities.as_ref().expect("a secured server");
    let ids_dir = ids
        .seed_file(Identity::Admin)
        .parent()
        .expect("folder")
        .to_path_buf();
    let pipeline = env.dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[pipeline]\ndata_dir = {:?}\nidentities_dir = {:?}\n[nats]\nurl = {:?}\n",
            env.dir.path().join("data").display().to_string(),
            ids_dir.display().to_string(),
            env.server.url()
        ),
    )
    .expect("write pipeline");
    pipeline
}

/// `pcb models ARGS` with `pipeline`: whether it succeeded, and its output (stdout, then
/// stderr).
pub fn pcb_models_try(pipeline: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("pcb"))
        .arg("models")
        .args(args)
        .arg("--pipeline")
        .arg(pipeline)
        .stdin(Stdio::null())
        .output()
        .expect("run pcb");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `pcb models ARGS`, asserted successful; its output.
pub fn pcb_models(pipeline: &Path, args: &[&str]) -> String {
    let (ok, text) = pcb_models_try(pipeline, args);
    assert!(ok, "pcb models {args:?}:\n{text}");
    text
}

/// Every event on `pcb.models.events` so far.
pub async fn model_events(env: &Env) -> Vec<ModelEvent> {
    env.read_all(STREAM_TRAINING, "pcb.models.events")
        .await
        .into_iter()
        .map(|(_, p)| decode::<ModelEvent>(&p, None).expect("event"))
        .collect()
}

/// Model `name`'s entry in the viewer's Models API (null when it has none).
pub async fn models_entry(viewer: std::net::SocketAddr, name: &str) -> serde_json::Value {
    let (status, body) = http_get(viewer, "/api/models").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["models"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == name).cloned())
        .unwrap_or_default()
}

/// Decodes messages read from `pcb.detections` (or the shadow subject) as detections.
pub fn detections_of(messages: Vec<(String, Vec<u8>)>) -> Vec<Detection> {
    messages
        .into_iter()
        .map(|(_, p)| decode::<Detection>(&p, None).expect("detection"))
        .collect()
}
