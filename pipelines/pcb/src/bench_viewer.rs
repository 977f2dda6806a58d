//! `pcb bench viewer`: page and API load times of the viewer with a large detections
//! stream (100,000 by default) on a private nats-server, beside what one page would cost
//! if it recomputed its aggregates from the stream instead of reading the viewer's index.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream;
use futures::StreamExt;
use pcb_schemas::{
    decode, Defect, Detection, EncodedImage, ModelRef, CLASS_NAMES, STREAM_DETECTIONS,
    SUBJECT_DETECTIONS, SUBJECT_ENCODED,
};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::server::NatsServer;

/// Flags of `pcb bench viewer`.
#[derive(clap::Args, Clone, Debug)]
pub struct ViewerBenchArgs {
    /// Detections in the stream.
    #[arg(long, default_value_t = 100_000)]
    pub detections: usize,
    /// Timed requests per row (the median is shown).
    #[arg(long, default_value_t = 7)]
    pub repeat: usize,
    /// Skip the page loads in headless Chromium (tests/browser, deploy/setup.sh).
    #[arg(long)]
    pub no_browser: bool,
}

/// One GET on a fresh connection: the status and the body.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    Ok(parse_response(&raw))
}

/// The status code and the body of a raw HTTP/1.1 response, as read to the end of a
/// `Connection: close` exchange (0 and an empty body where it has none); also the
/// viewer's tests' reader.
pub fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or_else(String::new, |(_, b)| b.to_string());
    (status, body)
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// A detection like the detector's, on one of four lines over the last week.
fn synthetic(i: usize, rng: &mut rand_chacha::ChaCha8Rng, now: i64, id: String) -> Detection {
    let n = [0, 0, 0, 1, 1, 2, 3][rng.gen_range(0..7)];
    let defects: Vec<Defect> = (0..n)
        .map(|_| {
            let class_id = rng.gen_range(1..=6u16);
            let (x, y) = (rng.gen_range(0.0..600.0f32), rng.gen_range(0.0..600.0f32));
            Defect {
                x1: x,
                y1: y,
                x2: x + rng.gen_range(8.0..40.0),
                y2: y + rng.gen_range(8.0..40.0),
                class_id,
                class: CLASS_NAMES[class_id as usize - 1].to_string(),
                score: rng.gen_range(0.3..1.0),
            }
        })
        .collect();
    let at = now - rng.gen_range(0..7 * 86_400_000i64);
    let verdict = if defects.iter().any(|d| d.score >= 0.5) {
        pcb_schemas::Verdict::Fail
    } else {
        pcb_schemas::Verdict::Pass
    };
    Detection {
        image_id: id,
        board_id: format!("{:08}", 10_000_000 + i),
        line_id: format!("line-{}", 1 + i % 4),
        source: format!("line-{}/{:08}_test.jpg", 1 + i % 4, 10_000_000 + i),
        captured_at: at - 2000,
        detected_at: at,
        model: ModelRef {
            name: "pcb-defects".into(),
            version: 1,
        },
        defects,
        verdict,
        inference_ms: rng.gen_range(150.0..450.0),
    }
}

/// A few real boards, so board pages have images to show.
async fn publish_boards(js: &jetstream::Context, dir: &Path) -> anyhow::Result<Vec<String>> {
    pcb_synth::generate(
        &pcb_synth::SynthOptions {
            count: 3,
            seed: 3,
            size: 640,
            val_fraction: 0.0,
        },
        dir,
        &mut |_, _| {},
    )?;
    let mut ids = Vec::new();
    let mut files = Vec::new();
    collect(dir, &mut files);
    files.sort();
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    for test in files
        .iter()
        .filter(|f| f.to_string_lossy().ends_with("_test.jpg"))
    {
        let bytes = std::fs::read(test)?;
        let temp = pcb_datasets::template_of(test).and_then(|t| std::fs::read(t).ok());
        let id = pcb_schemas::image_id(&bytes);
        let rec = EncodedImage {
            image_id: id.clone(),
            board_id: "bench".into(),
            line_id: "line-1".into(),
            source: test.display().to_string(),
            captured_at_ms: pcb_common::now_ms(),
            encoded_at_ms: pcb_common::now_ms(),
            image_b64: b64(&bytes),
            width: 640,
            height: 640,
            channels: 1,
            format: "jpeg".into(),
            sha256: id.clone(),
            labels: Some(Vec::new()),
            label_format: None,
            template_b64: temp.as_deref().map(b64),
            split_hint: None,
            revision: None,
            image_ref: None,
            template_ref: None,
        };
        pcb_common::publish(js, SUBJECT_ENCODED.into(), &rec).await?;
        ids.push(id);
    }
    Ok(ids)
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                collect(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

/// What a page would cost without the index: read every detection and sum them up.
async fn recompute(js: &jetstream::Context, n: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let stream = js.get_stream(STREAM_DETECTIONS).await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: SUBJECT_DETECTIONS.into(),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let (mut seen, mut failed, mut defects) = (0usize, 0usize, 0usize);
    while seen < n {
        let Some(m) = messages.next().await else {
            break;
        };
        let d: Detection = decode(&m?.payload, None)?;
        seen += 1;
        failed += usize::from(d.verdict == "fail");
        defects += d.defects.len();
    }
    if seen < n {
        bail!("read {seen} of {n} detections");
    }
    tracing::debug!(failed, defects, "recomputed");
    Ok(t.elapsed())
}

/// Runs the benchmark and prints its table.
pub async fn run(args: &ViewerBenchArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let nats_dir = tmp.path().join("nats");
    let server = tokio::task::spawn_blocking(move || NatsServer::start(&nats_dir, 0)).await??;
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client.clone());
    pcb_common::topology::provision_defaults(&js).await?;
    let boards = publish_boards(&js, &tmp.path().join("boards")).await?;

    eprintln!("bench: publishing {} detections", args.detections);
    let t = Instant::now();
    let now = pcb_common::now_ms();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut pending = Vec::new();
    for i in 0..args.detections {
        // The last few answer the real boards, so their pages show images.
        let id = match args.detections - i {
            k if k <= boards.len() => boards[k - 1].clone(),
            _ => format!("{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15),
        };
        let d = synthetic(i, &mut rng, now, id);
        let payload = pcb_schemas::encode(&d)?;
        let mut headers = async_nats::HeaderMap::new();
        for (k, v) in pcb_schemas::headers_for(&d) {
            headers.insert(k, v.as_str());
        }
        pending.push(
            js.publish_with_headers(SUBJECT_DETECTIONS, headers, payload.into())
                .await?,
        );
        if pending.len() >= 2000 {
            for p in pending.drain(..) {
                p.await?;
            }
        }
    }
    for p in pending.drain(..) {
        p.await?;
    }
    let publish_s = t.elapsed().as_secs_f64();

    let rss_before = rss_mib();
    let cfg: pcb_viewer::FileConfig = toml::from_str(&format!(
        "[nats]\nurl = {:?}\n[metrics]\naddr = \"\"\n[viewer]\naddr = \"127.0.0.1:0\"\n",
        server.url()
    ))?;
    let cfg = cfg
        .validate()
        .map_err(|p| anyhow::anyhow!("viewer config: {p}"))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let stop = pcb_common::Shutdown::new();
    let (c, s) = (client.clone(), stop.clone());
    let started = Instant::now();
    let viewer = tokio::spawn(async move { pcb_viewer::run_with(cfg, c, s, Some(tx)).await });
    let addr = rx.await.context("the viewer did not start")?;
    let want = format!("\"indexed\":{}", args.detections);
    loop {
        if get(addr, "/api/status").await?.1.contains(&want) {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!(
                "the viewer did not index {} detections in 10 minutes",
                args.detections
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let index_s = started.elapsed().as_secs_f64();
    let rss_after = rss_mib();
    let board = boards.last().cloned().unwrap_or_default();
    let rows: Vec<(&str, String)> = vec![
        ("page shell (any page)", "/".into()),
        ("app.js", "/assets/app.js".into()),
        ("overview, all time", "/api/overview?window=0".into()),
        ("overview, last 24 h", "/api/overview?window=86400".into()),
        (
            "board list, page 1",
            "/api/detections?page=1&page_size=50".into(),
        ),
        (
            "board list, page 1000",
            "/api/detections?page=1000&page_size=50".into(),
        ),
        (
            "board list, line+fail+class",
            "/api/detections?line=line-2&verdict=fail&class=short&page_size=50".into(),
        ),
        ("lines and classes", "/api/lines".into()),
        ("one board", format!("/api/boards/{board}")),
        ("its image", format!("/api/images/{board}/image")),
        ("models", "/api/models".into()),
        (
            "absurd page size (400)",
            "/api/detections?page_size=99999999".into(),
        ),
    ];
    println!(
        "viewer with {} detections on a private nats-server: published in {publish_s:.1} s; indexed from the stream in {index_s:.2} s; process RSS {rss_before:.0} MiB -> {rss_after:.0} MiB",
        args.detections
    );
    println!(
        "{:<30} {:>7} {:>10} {:>11} {:>11}",
        "request", "status", "bytes", "median ms", "max ms"
    );
    for (name, path) in &rows {
        let mut times = Vec::new();
        let mut last = (0, 0);
        for _ in 0..args.repeat.max(1) {
            let t = Instant::now();
            let (status, body) = get(addr, path).await?;
            last = (status, body.len());
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{name:<30} {:>7} {:>10} {:>11.2} {:>11.2}",
            last.0,
            last.1,
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
    let full = recompute(&js, args.detections).await?;
    println!(
        "{:<30} {:>7} {:>10} {:>11.2} {:>11}",
        "reference: recompute (stream)",
        "-",
        "-",
        full.as_secs_f64() * 1e3,
        "-"
    );
    println!(
        "(the reference reads and decodes every detection once, as a page without the index would)"
    );

    if !args.no_browser {
        let script = Path::new("tests/browser/viewer.mjs");
        if !script.exists() {
            bail!(
                "{} not found: run from the project root (or --no-browser)",
                script.display()
            );
        }
        let opts = serde_json::json!({"boards": [board], "repeat": args.repeat.max(1)});
        let out = tokio::process::Command::new("node")
            .arg(script)
            .arg("timing")
            .arg(format!("http://{addr}/"))
            .arg(opts.to_string())
            .output()
            .await
            .context("running node (deploy/setup.sh installs it)")?;
        if !out.status.success() {
            bail!(
                "viewer.mjs timing failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        println!(
            "\nheadless Chromium, navigation to the page's first complete render (data-ready):"
        );
        println!("{:<30} {:>11} {:>11}", "page", "median ms", "max ms");
        for r in v["rows"].as_array().cloned().unwrap_or_default() {
            println!(
                "{:<30} {:>11.0} {:>11.0}{}",
                r["page"].as_str().unwrap_or("?"),
                r["median_ms"].as_f64().unwrap_or(f64::NAN),
                r["max_ms"].as_f64().unwrap_or(f64::NAN),
                match r["error"].as_str() {
                    Some(e) if !e.is_empty() => format!("  error: {e}"),
                    _ => String::new(),
                }
            );
        }
    }
    stop.trigger();
    let _ = viewer.await;
    drop(server);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_gives_its_status_and_body() {
        let raw =
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n\r\n{\"error\":\"x\"}";
        assert_eq!(parse_response(raw), (404, "{\"error\":\"x\"}".to_string()));
        assert_eq!(parse_response(b""), (0, String::new()));
    }
}
