//! The viewer against a real pipeline (nats-server, encoder, router, detector processes)
//! fed with synthetic boards, driven in Debian's headless Chromium by
//! `tests/browser/viewer.mjs`: a board's boxes, the confidence slider, the overview's yield
//! and a promotion from the Models page, checked against the streams and the registry;
//! bad paths, ids and page sizes answered with 4xx and a message; an upload detected; a
//! viewer with a token refusing changes without it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pcb_registry::Registry;
use pcb_schemas::{decode, EncodedImage, STREAM_DETECTIONS, STREAM_IMAGES};
use pcb_tests::{browser, wait_until, Env};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MODEL: &str = "pcb-view";
const BOARDS: usize = 12;

/// One HTTP/1.1 exchange on a fresh connection, the path sent exactly as given (no
/// normalisation, so `../` reaches the server); returns the status and the body.
async fn http_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &str,
    body: &[u8],
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra_headers}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    pcb::bench_viewer::parse_response(&raw)
}

async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    http_with(addr, method, path, "", body).await
}

async fn http_json(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    http_with(
        addr,
        "POST",
        path,
        "Content-Type: application/json\r\n",
        body.as_bytes(),
    )
    .await
}

fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts/viewer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_sees_the_boxes_the_slider_the_yield_and_a_promotion() {
    let env = Env::start().await;
    let registry = Registry::open(&env.js).await.expect("registry");
    let v1 = pcb_tests::register_random_model(&registry, MODEL, env.dir.path(), 1).await;
    let v2 = pcb_tests::register_random_model(&registry, MODEL, env.dir.path(), 2).await;
    registry.promote(MODEL, v1, "test").await.expect("promote");
    // Random weights score around 1/7: a low verdict threshold gives both verdicts.
    let (mut det, det_log) =
        pcb_tests::spawn_detector_with(&env, "det", MODEL, "fail_threshold = 0.95\n");
    let (stop, stages) = env.start_encoder_router();

    let viewer = env.start_viewer("").await;
    let addr = viewer.addr;
    let url = format!("http://{addr}/");

    let boards = env.dir.path().join("boards");
    pcb_tests::synth_sized(&boards, BOARDS, 5, 256, 0.0);
    env.import(&boards).await;
    let done = wait_until(Duration::from_secs(300), || async {
        env.count(STREAM_DETECTIONS, "pcb.detections").await >= BOARDS as u64
            && http(addr, "GET", "/api/status", b"")
                .await
                .1
                .contains(&format!("\"indexed\":{BOARDS}"))
    })
    .await;
    assert!(
        done,
        "{BOARDS} boards were not detected and indexed:\n{}",
        std::fs::read_to_string(&det_log).unwrap_or_default()
    );

    // The truth, from the streams.
    let all = env.detections().await;
    let passed = all.iter().filter(|d| d.verdict == "pass").count();
    let want_yield = passed as f64 / all.len() as f64;
    for d in &all {
        let top = d.defects.iter().map(|x| x.score).fold(0f32, f32::max);
        println!("{} {} top score {top:.3}", d.board_id, d.verdict);
    }
    let board = all
        .iter()
        .max_by_key(|d| d.defects.len())
        .expect("a detection");
    assert!(
        board.defects.len() >= 2,
        "the busiest board has {} defects",
        board.defects.len()
    );
    let labels = env
        .read_all(STREAM_IMAGES, "pcb.images.encoded")
        .await
        .into_iter()
        .map(|(_, p)| decode::<EncodedImage>(&p, None).expect("encoded"))
        .find(|e| e.image_id == board.image_id)
        .and_then(|e| e.labels)
        .map_or(0, |l| l.len());
    let mut scores: Vec<f32> = board.defects.iter().map(|d| d.score).collect();
    scores.sort_by(f32::total_cmp);
    // A slider stop (steps of 0.01) near the median that no score sits on.
    let mut notch = (f64::from(scores[scores.len() / 2]) * 100.0).round() as i64;
    while scores
        .iter()
        .any(|s| (f64::from(*s) - notch as f64 / 100.0).abs() < 0.002)
    {
        notch += 1;
    }
    let slider = notch as f64 / 100.0;
    let want_visible = scores.iter().filter(|s| f64::from(**s) >= slider).count();

    let out = browser(
        "check",
        &url,
        &serde_json::json!({
            "board": board.image_id,
            "slider": slider,
            "cross_site": {"name": MODEL, "version": v2},
            "promote": {"name": MODEL, "version": v2},
            "shots": artifacts().display().to_string(),
        }),
    );
    println!("{out}");
    assert_eq!(
        out["page_errors"],
        serde_json::json!([]),
        "script errors in the page"
    );
    let seen_yield = out["overview"]["yield"].as_f64().expect("yield");
    assert!(
        (seen_yield - want_yield).abs() < 1e-9,
        "overview yield {seen_yield} vs {passed}/{} pass verdicts",
        all.len()
    );
    assert_eq!(out["overview"]["inspected"], BOARDS);
    assert_eq!(
        out["board"]["boxes"],
        board.defects.len(),
        "one box per defect"
    );
    assert_eq!(out["board"]["visible_before"], board.defects.len());
    assert_eq!(out["board"]["gt_boxes"], labels, "ground-truth boxes");
    assert_eq!(
        out["board"]["visible_after"], want_visible,
        "boxes at or above {slider} after moving the slider"
    );
    assert!(
        want_visible < board.defects.len(),
        "the slider hid some boxes"
    );
    // Form posts from another origin were refused, so the Models page still found v1 live.
    assert_eq!(
        out["cross_site"]["statuses"],
        serde_json::json!({"promote": 403, "upload": 403}),
        "form posts from {} to promote and upload",
        out["cross_site"]["from"]
    );
    assert_eq!(out["models"]["live_before"], v1.to_string());
    assert_eq!(out["models"]["live_after"], v2.to_string());
    assert_eq!(
        registry.live(MODEL).await.expect("live").map(|l| l.version),
        Some(v2),
        "the registry's live version changed"
    );
    for shot in [
        "overview.png",
        "board.png",
        "board-slider.png",
        "boards.png",
        "models.png",
    ] {
        assert!(artifacts().join(shot).is_file(), "screenshot {shot}");
    }

    // Bad requests get 4xx with a message.
    for (path, want) in [
        ("/assets/../../etc/passwd", 400),
        ("/api/images/../../../etc/passwd/image", 400),
        (&format!("/api/boards/{}", "0".repeat(64)) as &str, 404),
        ("/api/boards/not-an-id", 400),
        ("/boards/..%2F..%2Fetc%2Fpasswd", 400),
        ("/api/detections?page_size=1000000", 400),
        ("/api/detections?page=-3", 400),
        ("/api/overview?window=forever", 400),
        ("/api/no-such-thing", 404),
    ] {
        let (status, body) = http(addr, "GET", path, b"").await;
        assert_eq!(status, want, "{path}: {body}");
        assert!(body.contains("\"error\""), "{path}: no message in {body:?}");
    }
    let promote99 = format!("/api/models/{MODEL}/promote");
    let (status, body) = http_json(addr, &promote99, "{\"version\": 99}").await;
    assert_eq!(status, 404, "{body}");

    // What a page on another site can make the operator's browser send is refused before
    // it reaches a handler, and the live model stays as it was.
    let live_before = registry.live(MODEL).await.expect("live").map(|l| l.version);
    let v1_body = format!("{{\"version\": {v1}}}");
    for (why, headers, want) in [
        ("a form post", "Content-Type: text/plain\r\n", 415),
        (
            "a url-encoded form",
            "Content-Type: application/x-www-form-urlencoded\r\n",
            415,
        ),
        (
            "a multipart form",
            "Content-Type: multipart/form-data; boundary=x\r\n",
            415,
        ),
        (
            "another origin",
            "Content-Type: application/json\r\nOrigin: http://evil.example\r\n",
            403,
        ),
        (
            "a cross-site fetch",
            "Content-Type: application/json\r\nSec-Fetch-Site: cross-site\r\n",
            403,
        ),
    ] {
        let (status, body) = http_with(addr, "POST", &promote99, headers, v1_body.as_bytes()).await;
        assert_eq!(status, want, "{why}: {body}");
        let (status, body) =
            http_with(addr, "POST", "/api/upload?name=x.png", headers, b"\x89PNG").await;
        assert!(
            status == 403 || status == 415,
            "{why} upload: {status} {body}"
        );
    }
    assert_eq!(
        registry.live(MODEL).await.expect("live").map(|l| l.version),
        live_before,
        "a refused request changed the live model"
    );
    // DNS rebinding: a name that resolves to loopback is not this viewer's name.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"GET /api/status HTTP/1.1\r\nHost: evil.example:8080\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    assert_eq!(pcb::bench_viewer::parse_response(&raw).0, 403);
    // Every answer carries the security headers.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(
        head.contains("content-security-policy: default-src 'self'"),
        "{head}"
    );
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");

    // An upload goes through the pipeline and its detection appears.
    let known: BTreeSet<String> = all.iter().map(|d| d.image_id.clone()).collect();
    // A board of its own, with its template, as the page sends it (JSON, base64).
    let extra = env.dir.path().join("upload");
    pcb_tests::synth_sized(&extra, 1, 77, 256, 0.0);
    let find = |suffix: &str| {
        fn walk(d: &Path, suffix: &str) -> Option<PathBuf> {
            for e in std::fs::read_dir(d).ok()?.flatten() {
                let p = e.path();
                if p.is_dir() {
                    if let Some(f) = walk(&p, suffix) {
                        return Some(f);
                    }
                } else if p.to_string_lossy().ends_with(suffix) {
                    return Some(p);
                }
            }
            None
        }
        std::fs::read(walk(&extra, suffix).expect("synth file")).expect("read")
    };
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let body = serde_json::json!({
        "image_b64": b64(&find("_test.jpg")),
        "template_b64": b64(&find("_temp.jpg")),
    })
    .to_string();
    let (status, reply) =
        http_json(addr, "/api/upload?name=probe_test.jpg&line=upload", &body).await;
    assert_eq!(status, 200, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).expect("json");
    let id = reply["image_id"].as_str().expect("image_id").to_string();
    assert!(!known.contains(&id));
    let answered = wait_until(Duration::from_secs(120), || async {
        http(addr, "GET", &format!("/api/boards/{id}"), b"").await.0 == 200
    })
    .await;
    assert!(
        answered,
        "the uploaded image was not detected:\n{}",
        std::fs::read_to_string(&det_log).unwrap_or_default()
    );
    // Without its template the template-comparing model cannot take the board: the event
    // stream says which stage refused it and why.
    let mut events = tokio::net::TcpStream::connect(addr).await.expect("connect");
    events
        .write_all(format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("subscribe");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alone = image::load_from_memory(&find("_test.jpg"))
        .expect("jpeg")
        .fliph();
    let mut png = std::io::Cursor::new(Vec::new());
    alone
        .write_to(&mut png, image::ImageFormat::Png)
        .expect("png");
    let (status, reply) = http_with(
        addr,
        "POST",
        "/api/upload?name=lonely.png&line=upload",
        "Content-Type: image/png\r\n",
        &png.into_inner(),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let lonely: serde_json::Value = serde_json::from_str(&reply).expect("json");
    let lonely = lonely["image_id"].as_str().expect("image_id").to_string();
    let mut seen = String::new();
    let refused = tokio::time::timeout(Duration::from_secs(120), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = events.read(&mut buf).await.expect("read events");
            if n == 0 {
                return false;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if let Some(at) = seen.find(&format!("\"image_id\":\"{lonely}\"")) {
                let start = seen[..at].rfind("event:").unwrap_or(0);
                if seen[start..].starts_with("event: rejected")
                    || seen[start..].starts_with("event:rejected")
                {
                    return true;
                }
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(
        refused,
        "no rejected event for the upload without a template:\n{seen}"
    );
    println!(
        "refusal seen by the page: {}",
        seen.lines()
            .rfind(|l| l.contains(&lonely))
            .unwrap_or_default()
    );

    let (status, body) = http_with(
        addr,
        "POST",
        "/api/upload?name=notes.txt",
        "Content-Type: application/octet-stream\r\n",
        b"hello, not an image",
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // A viewer with a token (as one beyond loopback must have) refuses changes without it.
    let guarded = env.start_viewer("token = \"s3cret\"\n").await;
    let addr2 = guarded.addr;
    let promote = format!("/api/models/{MODEL}/promote");
    let (status, body) = http_json(addr2, &promote, &v1_body).await;
    assert_eq!(status, 401, "{body}");
    let wrong = format!("{{\"version\": {v1}, \"token\": \"guess\"}}");
    assert_eq!(http_json(addr2, &promote, &wrong).await.0, 401);
    let right = format!("{{\"version\": {v1}, \"token\": \"s3cret\"}}");
    let (status, body) = http_json(addr2, &promote, &right).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        registry.live(MODEL).await.expect("live").map(|l| l.version),
        Some(v1)
    );
    let (status, body) = http_with(
        addr2,
        "POST",
        &format!("/api/models/{MODEL}/rollback"),
        "Authorization: Bearer s3cret\r\nContent-Type: application/json\r\n",
        b"",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("\"live\":{v2}")),
        "rolled back to v2: {body}"
    );
    // Its token guards uploads too.
    let (status, body) = http_with(
        addr2,
        "POST",
        "/api/upload?name=x.png",
        "Content-Type: image/png\r\n",
        b"\x89PNG",
    )
    .await;
    assert_eq!(status, 401, "{body}");

    viewer.stop().await;
    guarded.stop().await;
    stop.trigger();
    for h in stages {
        let _ = h.await;
    }
    let _ = det.kill();
}
