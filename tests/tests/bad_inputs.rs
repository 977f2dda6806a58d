//! A corpus of bad inputs dropped with good boards: each bad file gets a dead letter naming
//! the problem and ends up in `rejected/`; no stage exits; every good board goes through.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Cursor;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pcb_schemas::{decode, DeadLetter, STREAM_IMAGES, STREAM_REJECTED, STREAM_SHARDS};
use pcb_tests::{drop_into, stop_stages, synth, wait_until, Env};

fn encode(img: image::DynamicImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, fmt).expect("encode");
    out.into_inner()
}

// Every generated image differs: identical bytes are one image to the pipeline (same id).
static VARIANT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn variant() -> u32 {
    VARIANT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let v = variant();
    let g = image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([if ((x + v) / 8 + y / 8).is_multiple_of(2) {
            0
        } else {
            255
        }])
    });
    encode(g.into(), image::ImageFormat::Jpeg)
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let v = variant();
    let g = image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([((x * 31 + y * 17 + v) % 251) as u8])
    });
    encode(g.into(), image::ImageFormat::Png)
}

fn noise_png(w: u32, h: u32) -> Vec<u8> {
    let mut state = 0x1234_5678u32;
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        let mut px = [0u8; 3];
        for p in &mut px {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            *p = state as u8;
        }
        image::Rgb(px)
    });
    encode(img.into(), image::ImageFormat::Png)
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A valid tiny PNG whose header claims 30000x30000 (a decompression bomb's calling card).
fn bomb_png() -> Vec<u8> {
    let mut b = png(1, 1);
    // IHDR data starts at 16 (8 signature + 4 length + 4 type); CRC covers type + data.
    b[16..20].copy_from_slice(&30000u32.to_be_bytes());
    b[20..24].copy_from_slice(&30000u32.to_be_bytes());
    let crc = crc32(&b[12..29]);
    b[29..33].copy_from_slice(&crc.to_be_bytes());
    b
}

fn voc(name: &str, b: [i32; 4]) -> String {
    format!(
        "<annotation><object><name>{name}</name><bndbox><xmin>{}</xmin><ymin>{}</ymin>\
         <xmax>{}</xmax><ymax>{}</ymax></bndbox></object></annotation>",
        b[0], b[1], b[2], b[3]
    )
}

fn put(root: &Path, rel: impl AsRef<Path>, bytes: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, bytes).expect("write");
}

/// A 64x64 `<stem>.png` with a VOC label `<stem>.xml` of one `class` box.
fn put_voc(root: &Path, stem: &str, class: &str, b: [i32; 4]) {
    put(root, format!("{stem}.png"), &png(64, 64));
    put(root, format!("{stem}.xml"), voc(class, b).as_bytes());
}

/// DeepPCB pair `n` as the dataset lays it out: a 64x64 test image, the template when
/// given, and the label file `label`.
fn put_deeppcb(root: &Path, n: u32, template: Option<&[u8]>, label: &[u8]) {
    put(root, format!("dp/b/{n:08}_test.jpg"), &jpeg(64, 64));
    if let Some(t) = template {
        put(root, format!("dp/b/{n:08}_temp.jpg"), t);
    }
    put(root, format!("dp/b_not/{n:08}.txt"), label);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_inputs_are_dead_lettered_and_filed_while_good_ones_pass() {
    let env = Env::start().await;
    let staging = env.dir.path().join("staging");
    let s = &staging;
    let good_jpeg = jpeg(64, 64);
    put(s, "t01_truncated.jpg", &good_jpeg[..good_jpeg.len() / 2]);
    put(s, "t02_empty.jpg", b"");
    put(
        s,
        "t03_text.jpg",
        b"this is a text file, not a photo of a board\n",
    );
    put(s, "t04_bomb.png", &bomb_png());
    put_voc(s, "t05_outside", "short", [50, 10, 80, 20]);
    put(s, "t06_badxml.png", &png(64, 64));
    put(
        s,
        "t06_badxml.xml",
        b"<annotation><object><name>open</name></annotation>",
    );
    put_deeppcb(s, 7000001, None, b"1 1 10 10 9\n");
    put_deeppcb(s, 7000002, Some(&jpeg(32, 32)), b"1 1 10 10 1\n");
    put_deeppcb(s, 7000003, Some(b"not a template"), b"1 1 10 10 1\n");
    put_deeppcb(s, 7000004, None, b"one two three\n");
    put(s, "t10_huge.png", &noise_png(200, 200));
    put(
        s,
        "t11_garbage.png",
        &[0x13, 0x37, 0x00, 0xfe, 0x42, 0x42, 0x42, 0x42, 0x01],
    );
    let p = png(64, 64);
    put(s, "t12_cut.png", &p[..p.len() * 2 / 3]);
    put_voc(s, "t13_inverted", "open", [40, 10, 20, 30]);
    put_voc(s, "t14_scratch", "scratch", [1, 1, 9, 9]);
    put(s, "t15_yolo.png", &png(64, 64));
    put(s, "t15_yolo.txt", b"0 0.5 0.5 0.1 0.1\n");
    let mut badjpeg = vec![0xFF, 0xD8, 0xFF, 0xE0];
    badjpeg.extend((0..400u32).map(|i| (i * 7) as u8));
    badjpeg.extend([0xFF, 0xD9]);
    put(s, "t16_badjpeg.jpg", &badjpeg);
    let non_utf8 = OsStr::from_bytes(b"t17_\xff\xfe.jpg");
    put(s, non_utf8, &jpeg(64, 64));
    // What each bad file above gets, one row per file: (relative path, stage that refuses
    // it, reason code, words the reason must contain).
    #[rustfmt::skip]
    let expect: Vec<(PathBuf, &str, &str, &str)> = [
        ("t01_truncated.jpg", "encoder", "truncated-image", "truncated JPEG"),
        ("t02_empty.jpg", "ingester", "empty-file", "empty"),
        ("t03_text.jpg", "ingester", "not-an-image", "not an image"),
        ("t04_bomb.png", "encoder", "too-large", "30000x30000"),
        ("t05_outside.png", "encoder", "label-outside-image", "outside the 64x64 image"),
        ("t06_badxml.png", "ingester", "label-parse", "t06_badxml.xml"),
        ("dp/b/07000001_test.jpg", "encoder", "unknown-class", "unknown class id 9"),
        ("dp/b/07000002_test.jpg", "encoder", "template-size-mismatch", "template is 32x32"),
        ("dp/b/07000003_test.jpg", "ingester", "not-an-image", "template"),
        ("dp/b/07000004_test.jpg", "ingester", "label-parse", "line 1"),
        ("t10_huge.png", "ingester", "too-large", "max_image_bytes"),
        ("t11_garbage.png", "ingester", "not-an-image", "13 37 00 fe"),
        ("t12_cut.png", "encoder", "corrupt-image", "does not decode"),
        ("t13_inverted.png", "encoder", "label-degenerate", "x1 < x2"),
        ("t14_scratch.png", "encoder", "unknown-class", "\"scratch\""),
        ("t15_yolo.png", "ingester", "label-parse", "class list"),
        ("t16_badjpeg.jpg", "encoder", "corrupt-image", "header is unreadable"),
    ]
    .into_iter()
    .map(|(rel, stage, code, words)| (PathBuf::from(rel), stage, code, words))
    .chain([(PathBuf::from(non_utf8), "ingester", "bad-file-name", "not valid UTF-8")])
    .collect();
    assert!(expect.len() >= 15);

    // Good boards in the same batch.
    synth(&s.join("good"), 10, 3);
    put_voc(s, "g01", "spur", [5, 5, 20, 20]);
    let good: u64 = 11;

    let extra = format!(
        "[ingester]\nwatch_dir = {:?}\nsettle_ms = 200\nrescan_secs = 2\nmax_image_bytes = 100000\n",
        env.watch_dir().display().to_string()
    );
    let (shutdown, mut handles) = env.start_encoder_router();
    handles.push(env.spawn_stage::<pcb_ingester::IngesterStage>(&extra, &shutdown));
    drop_into(s, &env.watch_dir());

    let rejected_dir = env.watch_dir().join("rejected");
    let all_filed = wait_until(Duration::from_secs(120), || async {
        let letters = env.count(STREAM_REJECTED, "pcb.rejected.").await as usize;
        letters >= expect.len()
            && env.count(STREAM_SHARDS, "pcb.shards.").await >= good
            && expect
                .iter()
                .all(|(rel, ..)| rejected_dir.join(rel).exists())
    })
    .await;
    let letters: BTreeMap<String, DeadLetter> = env
        .read_all(STREAM_REJECTED, "pcb.rejected.>")
        .await
        .into_iter()
        .map(|(_, p)| {
            let d: DeadLetter = decode(&p, None).expect("dead letter");
            (d.source.clone(), d)
        })
        .collect();
    let missing: Vec<_> = expect
        .iter()
        .filter(|(rel, ..)| !rejected_dir.join(rel).exists())
        .map(|e| &e.0)
        .collect();
    assert!(
        missing.is_empty(),
        "not moved to rejected/: {missing:?}; letters: {:?}",
        letters.keys()
    );
    for (rel, stage, code, words) in &expect {
        let key = rel.to_string_lossy().into_owned();
        let d = letters
            .get(&key)
            .unwrap_or_else(|| panic!("no dead letter for {key}; have {:?}", letters.keys()));
        assert_eq!(
            (d.stage.as_str(), d.reason_code.as_str()),
            (*stage, *code),
            "{key}: {}",
            d.reason
        );
        assert!(
            d.reason.contains(words),
            "{key}: reason {:?} lacks {words:?}",
            d.reason
        );
        assert!(
            rejected_dir.join(rel).exists(),
            "{key} not moved to rejected/"
        );
        let mut reason_file = rejected_dir.join(rel).into_os_string();
        reason_file.push(".reason.txt");
        let text = std::fs::read_to_string(&reason_file).expect("reason file");
        assert!(text.contains(code), "{text}");
    }
    assert!(all_filed, "not everything was filed away");
    assert_eq!(
        letters.len(),
        expect.len(),
        "unexpected dead letters: {:?}",
        letters.keys()
    );
    let images = env.subject_counts(STREAM_IMAGES).await;
    let encoder_rejects = expect.iter().filter(|e| e.1 == "encoder").count() as u64;
    assert_eq!(images.get("pcb.images.encoded"), Some(&good));
    assert_eq!(
        images.get("pcb.images.raw"),
        Some(&(good + encoder_rejects))
    );
    assert_eq!(env.count(STREAM_SHARDS, "pcb.shards.").await, good);
    for h in &handles {
        assert!(!h.is_finished(), "a stage exited on bad input");
    }
    stop_stages(&shutdown, handles).await;
}
