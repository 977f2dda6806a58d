//! Boards too large for one message (issue 17, item 5): a 6000x4000 colour JPEG scan with
//! its template, and an uncompressed RGB TIFF pair, each over the server's payload limit
//! once base64-encoded, go through `pcb up` to one detection each. Their files travel
//! through the `pcb_image_files` object bucket: the raw and encoded records name them by
//! sha256 and carry no bytes, a template shared by two boards is stored once, the viewer
//! serves a referenced image, a record naming a file the bucket does not have is a
//! dead letter (`image-gone`), not a crash, and an upload in the viewer over the limit is
//! stored by reference too.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;

use futures::StreamExt;
use pcb_schemas::{
    decode, image_id, DeadLetter, Detection, EncodedImage, ObjectRef, RawImage,
    OBJECTS_IMAGE_FILES, STREAM_DETECTIONS, STREAM_IMAGES, STREAM_REJECTED, SUBJECT_ENCODED,
    SUBJECT_RAW,
};
use pcb_tests::up::Pipeline;
use pcb_tests::{read_all, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The private server's `max_payload`.
const MAX_PAYLOAD: usize = pcb::server::MAX_PAYLOAD_BYTES;

/// A board-like colour image: a copper grid over a gradient, with per-pixel noise (as a
/// scanner's) so that it compresses no better than a real scan; `defect` adds a blob.
fn board(w: u32, h: u32, seed: u32, defect: bool) -> image::RgbImage {
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    image::RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state % 48) as i32 - 24;
        let trace = (x % 97 < 9) || (y % 61 < 7);
        let blob =
            defect && (x as i64 - w as i64 / 3).pow(2) + (y as i64 - h as i64 / 2).pow(2) < 900;
        let base: [i32; 3] = if trace || blob {
            [190, 120, 60]
        } else {
            [30 + (x * 60 / w) as i32, 90 + (y * 60 / h) as i32, 40]
        };
        image::Rgb(base.map(|c| (c + noise).clamp(0, 255) as u8))
    })
}

fn jpeg(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(img)
        .expect("jpeg");
    out.into_inner()
}

/// An uncompressed TIFF (the `image` crate's TIFF encoder writes no compression).
fn tiff(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Tiff)
        .expect("tiff");
    out.into_inner()
}

/// Writes `bytes` into the inbox all at once (written beside, then renamed), so the
/// ingester never sees half a file.
fn drop_file(staging: &Path, inbox: &Path, name: &str, bytes: &[u8]) {
    let tmp = staging.join(name);
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, inbox.join(name)).expect("rename");
}

/// Whether a pair would be refused as one message: both files in base64, with the
/// ingester's margin for the rest of the record.
fn over_the_limit(image: &[u8], template: &[u8]) -> bool {
    (image.len() + template.len()) * 4 / 3 + 64 * 1024 > MAX_PAYLOAD
}

/// GET `path` from the viewer: status and body bytes.
async fn get(addr: &str, path: &str) -> (u16, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    assert!(
        !head.to_lowercase().contains("transfer-encoding: chunked"),
        "{head}"
    );
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, raw[split + 4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_6000x4000_scan_and_a_tiff_pair_go_through_the_object_store_to_detections() {
    let made = Instant::now();
    let scan = jpeg(&board(6000, 4000, 1, true));
    let scan_temp = jpeg(&board(6000, 4000, 2, false));
    let tif = tiff(&board(2048, 2048, 3, true));
    let tif_temp = tiff(&board(2048, 2048, 4, false));
    // A second board of the same design: its own image, the same golden template.
    let tif2 = tiff(&board(2048, 2048, 5, true));
    println!(
        "made in {:.1}s: scan {} + template {} bytes, TIFF {} + template {} bytes, TIFF 2 {} bytes (max_payload {MAX_PAYLOAD})",
        made.elapsed().as_secs_f64(),
        scan.len(),
        scan_temp.len(),
        tif.len(),
        tif_temp.len(),
        tif2.len()
    );
    // Each board really is over the limit: refused before this change, by reference now.
    assert!(over_the_limit(&scan, &scan_temp));
    assert!(over_the_limit(&tif, &tif_temp));
    assert!(over_the_limit(&tif2, &tif_temp));
    // And each file under the ingester's max_image_bytes (16 MiB by default).
    for f in [&scan, &scan_temp, &tif, &tif_temp, &tif2] {
        assert!(f.len() < 16 << 20, "{}", f.len());
    }

    let p = Pipeline::up(&[]).await;
    let staging = p.dir.path().join("staging");
    std::fs::create_dir_all(&staging).expect("staging");
    let inbox = p.inbox();
    std::fs::create_dir_all(&inbox).expect("inbox");
    let started = Instant::now();
    // Templates first: a board is paired with the template beside it when it is read.
    drop_file(&staging, &inbox, "scan01_temp.jpg", &scan_temp);
    drop_file(&staging, &inbox, "tif01_temp.tif", &tif_temp);
    drop_file(&staging, &inbox, "tif02_temp.tif", &tif_temp);
    drop_file(&staging, &inbox, "scan01_test.jpg", &scan);
    drop_file(&staging, &inbox, "tif01_test.tif", &tif);
    drop_file(&staging, &inbox, "tif02_test.tif", &tif2);
    p.wait_detections(3).await;
    println!(
        "3 detections {:.1}s after the drop",
        started.elapsed().as_secs_f64()
    );

    // The files of each board, by image id.
    let boards: BTreeMap<String, (&str, &[u8], &[u8])> = [
        ("scan01_test.jpg", &scan[..], &scan_temp[..]),
        ("tif01_test.tif", &tif[..], &tif_temp[..]),
        ("tif02_test.tif", &tif2[..], &tif_temp[..]),
    ]
    .into_iter()
    .map(|(name, i, t)| (image_id(i), (name, i, t)))
    .collect();

    // Exactly one detection each.
    let detections = read_all(&p.js, STREAM_DETECTIONS, "pcb.detections").await;
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for (_, payload) in &detections {
        let d: Detection = decode(payload, None).expect("detection");
        *answered.entry(d.image_id.clone()).or_default() += 1;
        let (name, _, _) = boards.get(&d.image_id).expect("a board of this test");
        assert_eq!(d.source, *name);
        println!(
            "{name}: {} in {:.0} ms, {} defects",
            d.verdict,
            d.inference_ms,
            d.defects.len()
        );
    }
    assert_eq!(
        answered,
        boards
            .keys()
            .map(|k| (k.clone(), 1))
            .collect::<BTreeMap<_, _>>()
    );

    // The raw and encoded records name the files by sha256 and size, and carry none.
    let want = |bytes: &[u8]| Some(ObjectRef::of(bytes));
    let raws = read_all(&p.js, STREAM_IMAGES, SUBJECT_RAW).await;
    assert_eq!(raws.len(), 3);
    for (_, payload) in &raws {
        let r: RawImage = decode(payload, None).expect("raw");
        let (_, image, template) = boards.get(&r.image_id).expect("a board");
        assert!(r.image.is_empty() && r.template.is_none());
        assert_eq!(r.image_ref, want(image));
        assert_eq!(r.template_ref, want(template));
        let ir = r.image_ref.as_ref().expect("image ref");
        assert_eq!(
            (ir.name.as_str(), ir.size),
            (r.image_id.as_str(), image.len() as u64)
        );
        assert!(
            payload.len() < 4096,
            "a raw record by reference is small: {}",
            payload.len()
        );
    }
    let encoded = read_all(&p.js, STREAM_IMAGES, SUBJECT_ENCODED).await;
    assert_eq!(encoded.len(), 3);
    for (_, payload) in &encoded {
        let e: EncodedImage = decode(payload, None).expect("encoded");
        let (name, image, template) = boards.get(&e.image_id).expect("a board");
        assert!(e.image_b64.is_empty() && e.template_b64.is_none());
        assert_eq!(e.image_ref, want(image));
        assert_eq!(e.template_ref, want(template));
        let size = if name.starts_with("scan") {
            (6000, 4000)
        } else {
            (2048, 2048)
        };
        assert_eq!((e.width, e.height, e.channels), (size.0, size.1, 3));
        assert_eq!(
            e.format,
            if name.starts_with("scan") {
                "jpeg"
            } else {
                "tiff"
            }
        );
    }

    // Each distinct file is in the bucket once: the shared template too.
    let store =
        p.js.get_object_store(OBJECTS_IMAGE_FILES)
            .await
            .expect("bucket");
    let mut names = Vec::new();
    let mut list = store.list().await.expect("list");
    while let Some(info) = list.next().await {
        let info = info.expect("object info");
        names.push((info.name.clone(), info.size as u64));
    }
    names.sort();
    let mut distinct: Vec<(String, u64)> = [&scan, &scan_temp, &tif, &tif_temp, &tif2]
        .iter()
        .map(|b| (image_id(b), b.len() as u64))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    distinct.sort();
    assert_eq!(names.len(), 5, "{names:?}");
    assert_eq!(names, distinct);
    // Chunked by the store: no message near the payload limit.
    let mut bucket =
        p.js.get_stream(format!("OBJ_{OBJECTS_IMAGE_FILES}"))
            .await
            .expect("bucket stream");
    let info = bucket.info().await.expect("info");
    let stored: u64 = distinct.iter().map(|(_, s)| s).sum();
    println!(
        "bucket: {} objects, {} messages, {} bytes for {stored} bytes of files",
        names.len(),
        info.state.messages,
        info.state.bytes
    );
    assert!(
        info.state.bytes < stored + stored / 100,
        "stored twice? {}",
        info.state.bytes
    );

    // The viewer serves the referenced scan as it came.
    let viewer = std::fs::read_to_string(p.data.join("viewer.url")).expect("viewer url");
    let addr = viewer
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let (status, body) = get(&addr, &format!("/api/images/{}/image", image_id(&scan))).await;
    assert_eq!(status, 200);
    assert!(
        body == scan,
        "the viewer served {} bytes, not the scan",
        body.len()
    );
    let (status, _) = get(&addr, &format!("/api/images/{}/template", image_id(&tif))).await;
    assert_eq!(status, 200);

    // A record naming a file the bucket does not have: a dead letter, and the stages go on.
    let missing = b"a file that was never stored";
    let ghost = RawImage {
        image_id: image_id(missing),
        image: Vec::new(),
        template: None,
        labels: None,
        label_format: None,
        board_id: "ghost".into(),
        line_id: "line-1".into(),
        source: "ghost_test.jpg".into(),
        captured_at_ms: 1,
        split_hint: None,
        revision: None,
        image_ref: Some(ObjectRef::of(missing)),
        template_ref: None,
    };
    pcb_common::publish(&p.js, SUBJECT_RAW.into(), &ghost)
        .await
        .expect("published");
    let ghost_id = ghost.image_id.clone();
    let letter = || async {
        read_all(&p.js, STREAM_REJECTED, "pcb.rejected.encoder")
            .await
            .into_iter()
            .filter_map(|(_, b)| decode::<DeadLetter>(&b, None).ok())
            .find(|d| d.image_id.as_deref() == Some(ghost_id.as_str()))
    };
    assert!(
        wait_until(Duration::from_secs(60), || async {
            letter().await.is_some()
        })
        .await,
        "no dead letter for the missing file:\n{}",
        p.said()
    );
    let l = letter().await.expect("letter");
    assert_eq!(l.reason_code, "image-gone", "{}", l.reason);
    assert!(l.reason.contains(OBJECTS_IMAGE_FILES), "{}", l.reason);
    assert_eq!(l.source, "ghost_test.jpg");

    // An upload in the viewer over the payload limit is stored by reference too, not
    // refused: the raw record names the file, and the board is detected.
    // As JSON with its template (which the default model compares against): both under the
    // viewer's 32 MiB body limit, each over the payload limit once base64-encoded.
    let big = tiff(&board(1600, 1600, 6, true));
    let big_temp = tiff(&board(1600, 1600, 7, false));
    assert!(big.len() * 4 / 3 > MAX_PAYLOAD, "{}", big.len());
    let json = format!(
        "{{\"image_b64\":\"{}\",\"template_b64\":\"{}\"}}",
        base64::engine::general_purpose::STANDARD.encode(&big),
        base64::engine::general_purpose::STANDARD.encode(&big_temp)
    );
    let (status, body) = post(
        &addr,
        "/api/upload?name=big_upload.tif&line=upload",
        json.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let big_id = image_id(&big);
    let uploaded = || async {
        read_all(&p.js, STREAM_IMAGES, SUBJECT_RAW)
            .await
            .into_iter()
            .filter_map(|(_, b)| decode::<RawImage>(&b, None).ok())
            .find(|r| r.image_id == big_id)
    };
    assert!(
        wait_until(Duration::from_secs(30), || async {
            uploaded().await.is_some()
        })
        .await,
        "no raw record for the upload"
    );
    let r = uploaded().await.expect("raw");
    assert_eq!(r.source, "upload/big_upload.tif");
    assert!(r.image.is_empty());
    assert_eq!(r.image_ref, Some(ObjectRef::of(&big)));
    assert!(r.template.is_none());
    assert_eq!(r.template_ref, Some(ObjectRef::of(&big_temp)));
    let detected = || async {
        read_all(&p.js, STREAM_DETECTIONS, "pcb.detections")
            .await
            .into_iter()
            .filter_map(|(_, b)| decode::<Detection>(&b, None).ok())
            .any(|d| d.image_id == big_id)
    };
    assert!(
        wait_until(Duration::from_secs(180), || async { detected().await }).await,
        "the uploaded board was not detected:\n{}",
        p.said()
    );
}

/// POSTs `body` (JSON) to the viewer at `path`: status and body.
async fn post(addr: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, raw[split + 4..].to_vec())
}
