//! The base64 encoder stage: `pcb.images.raw` → full decode under limits, label checks →
//! `pcb.images.encoded`, or `pcb.rejected.encoder` with the precise reason.

use std::io::Cursor;

use base64::Engine;
use pcb_common::ack::Delivery;
use pcb_common::{Context, NoArgs, Outcome, Problems, Rejection, Stage, Validate};
use pcb_schemas::{image_id, BoxLabel, EncodedImage, RawImage, CLASS_NAMES, SUBJECT_ENCODED};
use serde::{Deserialize, Serialize};

pcb_common::declare_stage!(
    /// The encoder stage.
    Encoder = Encoder
);

/// Settings of the encoder (the `[encoder]` section, beside its consumer keys).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderSettings {
    /// Widest image accepted, in pixels.
    pub max_width: u32,
    /// Tallest image accepted, in pixels.
    pub max_height: u32,
    /// Most memory one decode may allocate, in bytes; refuses decompression bombs cheaply.
    pub max_alloc_bytes: u64,
    /// Class names, id = position + 1 (defaults to DeepPCB's six classes).
    pub classes: Vec<String>,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        EncoderSettings {
            max_width: 8192,
            max_height: 8192,
            max_alloc_bytes: 512 << 20,
            classes: CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl Stage for Encoder {
    type Settings = EncoderSettings;
    type Error = EncoderError;
    type Args = NoArgs;

    async fn run(config: Config, ctx: Context) -> Result<(), EncoderError> {
        let limits = std::sync::Arc::new(config.config.clone());
        pcb_common::stage::consume(&config, ctx, |js| {
            let files = pcb_common::LazyFiles::new(js.clone());
            move |d| handle(js.clone(), files.clone(), limits.clone(), d)
        })
        .await?;
        Ok(())
    }
}

impl Validate for EncoderSettings {
    type Config = Limits;

    fn validate(self, p: &mut Problems) -> Option<Limits> {
        p.at_least("encoder.max_width", self.max_width, 1);
        p.at_least("encoder.max_height", self.max_height, 1);
        p.check(
            self.max_alloc_bytes < 1 << 20,
            "encoder.max_alloc_bytes",
            "must be at least 1 MiB",
        );
        p.check(
            self.classes.is_empty(),
            "encoder.classes",
            "needs at least one class",
        );
        Some(Limits {
            max_width: self.max_width,
            max_height: self.max_height,
            max_alloc_bytes: self.max_alloc_bytes,
            classes: self.classes,
        })
    }
}

/// What the encoder accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Widest image, pixels.
    pub max_width: u32,
    /// Tallest image, pixels.
    pub max_height: u32,
    /// Most memory one decode may allocate, bytes.
    pub max_alloc_bytes: u64,
    /// Known class names, id = position + 1.
    pub classes: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        let mut p = Problems::default();
        EncoderSettings::default()
            .validate(&mut p)
            .unwrap_or(Limits {
                max_width: 0,
                max_height: 0,
                max_alloc_bytes: 0,
                classes: Vec::new(),
            })
    }
}

/// What decoding told about one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decoded {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Colour channels.
    pub channels: u8,
    /// Container format.
    pub format: image::ImageFormat,
}

/// Decodes `bytes` completely under `limits`; `what` ("image", "template") goes into
/// the reasons.
pub fn decode_image(bytes: &[u8], limits: &Limits, what: &str) -> Result<Decoded, Rejection> {
    if bytes.is_empty() {
        return Err(Rejection::new(
            "empty-file",
            format!("the {what} file is empty (0 bytes)"),
        ));
    }
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Rejection::new("unreadable", format!("reading the {what}: {e}")))?;
    let format = reader.format().ok_or_else(|| {
        Rejection::new(
            "not-an-image",
            format!(
                "the {what} is not an image: its first bytes {} match no known format \
                 (JPEG, PNG, BMP, TIFF)",
                pcb_common::first_bytes_hex(bytes)
            ),
        )
    })?;
    if format == image::ImageFormat::Jpeg && !has_jpeg_end(bytes) {
        // JPEG decoders pad a truncated scan with grey and report success: a board
        // half-missing must not pass as a good image.
        return Err(Rejection::new(
            "truncated-image",
            format!("the {what} is a truncated JPEG: no end-of-image marker"),
        ));
    }
    let (width, height) = reader.into_dimensions().map_err(|e| {
        Rejection::new(
            "corrupt-image",
            format!("the {what}'s header is unreadable ({format:?}): {e}"),
        )
    })?;
    if width == 0 || height == 0 {
        return Err(Rejection::new(
            "corrupt-image",
            format!("the {what} declares a size of {width}x{height}"),
        ));
    }
    if width > limits.max_width || height > limits.max_height {
        return Err(Rejection::new(
            "too-large",
            format!(
                "the {what} is {width}x{height} pixels, over the limit of {}x{}",
                limits.max_width, limits.max_height
            ),
        ));
    }
    if format == image::ImageFormat::Jpeg {
        let channels = decode_jpeg_strict(bytes, limits, what, width, height)?;
        return Ok(Decoded {
            width,
            height,
            channels,
            format,
        });
    }
    let mut reader = image::ImageReader::new(Cursor::new(bytes));
    reader.set_format(format);
    let mut lim = image::Limits::default();
    lim.max_image_width = Some(limits.max_width);
    lim.max_image_height = Some(limits.max_height);
    lim.max_alloc = Some(limits.max_alloc_bytes);
    reader.limits(lim);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => Rejection::new(
            "too-large",
            format!("decoding the {what} ({width}x{height}) would exceed the limits: {l}"),
        ),
        image::ImageError::Unsupported(u) => Rejection::new(
            "unsupported-format",
            format!("the {what} uses an unsupported {format:?} feature: {u}"),
        ),
        other => Rejection::new(
            "corrupt-image",
            format!("the {what} ({format:?}, {width}x{height}) does not decode: {other}"),
        ),
    })?;
    Ok(Decoded {
        width,
        height,
        channels: img.color().channel_count(),
        format,
    })
}

/// Decodes a JPEG with zune-jpeg in strict mode, which refuses what a lenient decoder
/// fills in silently (a bad Huffman code, a segment that ends early, a wrong restart
/// marker): a board with damaged scan data must not pass as a good image. Returns the
/// channel count.
fn decode_jpeg_strict(
    bytes: &[u8],
    limits: &Limits,
    what: &str,
    width: u32,
    height: u32,
) -> Result<u8, Rejection> {
    // At most 4 bytes a pixel come out (CMYK); refuse before allocating.
    let out_bytes = u64::from(width) * u64::from(height) * 4;
    if out_bytes > limits.max_alloc_bytes {
        return Err(Rejection::new(
            "too-large",
            format!(
                "decoding the {what} ({width}x{height}) would exceed the limits: up to \
                 {out_bytes} bytes, over max_alloc_bytes ({})",
                limits.max_alloc_bytes
            ),
        ));
    }
    let options = zune_core::options::DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(limits.max_width as usize)
        .set_max_height(limits.max_height as usize);
    let corrupt = |e: zune_jpeg::errors::DecodeErrors| {
        Rejection::new(
            "corrupt-image",
            format!("the {what} (Jpeg, {width}x{height}) has corrupt data: {e}"),
        )
    };
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(Cursor::new(bytes), options);
    decoder.decode_headers().map_err(corrupt)?;
    // Out in the file's own colour space: checking needs no conversion to RGB (a third of
    // the work, and three times the memory, for a grey board).
    let input = decoder.input_colorspace();
    if let Some(space) = input {
        decoder.set_options(options.jpeg_set_out_colorspace(space));
    }
    decoder.decode().map_err(corrupt)?;
    Ok(input.map_or(3, |c| c.num_components() as u8))
}

fn has_jpeg_end(bytes: &[u8]) -> bool {
    // Some cameras pad after the marker; look at the tail only so this stays cheap.
    let tail = &bytes[bytes.len().saturating_sub(1024)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

fn format_name(f: image::ImageFormat) -> String {
    f.extensions_str()
        .first()
        .map(|e| match *e {
            "jpg" => "jpeg".to_string(),
            "tif" => "tiff".to_string(),
            other => other.to_string(),
        })
        .unwrap_or_else(|| format!("{f:?}").to_lowercase())
}

/// Checks every box against the image size and the class list; the first bad box is the
/// reason.
pub fn check_labels(
    labels: &[BoxLabel],
    width: u32,
    height: u32,
    classes: &[String],
) -> Result<(), Rejection> {
    let (w, h) = (width as f32, height as f32);
    for (i, b) in labels.iter().enumerate() {
        let n = i + 1;
        let coords = format!("({}, {}, {}, {})", b.x1, b.y1, b.x2, b.y2);
        if ![b.x1, b.y1, b.x2, b.y2].iter().all(|v| v.is_finite()) {
            return Err(Rejection::new(
                "label-invalid",
                format!("box {n} {coords} has a coordinate that is not a number"),
            ));
        }
        if !(b.x1 < b.x2 && b.y1 < b.y2) {
            return Err(Rejection::new(
                "label-degenerate",
                format!("box {n} {coords} is empty or inverted: needs x1 < x2 and y1 < y2"),
            ));
        }
        if b.x1 < 0.0 || b.y1 < 0.0 || b.x2 > w || b.y2 > h {
            return Err(Rejection::new(
                "label-outside-image",
                format!("box {n} {coords} lies outside the {width}x{height} image"),
            ));
        }
        let known = b.class_id >= 1 && (b.class_id as usize) <= classes.len();
        if !known {
            let list = classes
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{} {c}", i + 1))
                .collect::<Vec<_>>()
                .join(", ");
            let what = if b.class_id == 0 {
                format!("class {:?}", b.class)
            } else {
                format!("class id {}", b.class_id)
            };
            return Err(Rejection::new(
                "unknown-class",
                format!("box {n} has unknown {what}; known classes: {list}"),
            ));
        }
    }
    Ok(())
}

/// Validates a raw record and builds its encoded record (pure: no I/O, unit tested). A
/// record whose files are in the image files' bucket comes with them read back into
/// `image` and `template` (see [`handle`]); its encoded record names them by the same
/// references instead of carrying them in base64.
pub fn encode_record(
    raw: &RawImage,
    limits: &Limits,
    now_ms: i64,
) -> Result<EncodedImage, Rejection> {
    let about = |r: Rejection| r.about(Some(raw.image_id.clone()), raw.source.clone());
    let actual = image_id(&raw.image);
    if actual != raw.image_id {
        return Err(about(Rejection::new(
            "image-id-mismatch",
            format!(
                "image_id {} is not the sha256 of the image bytes ({actual})",
                raw.image_id
            ),
        )));
    }
    let img = decode_image(&raw.image, limits, "image").map_err(about)?;
    if let Some(tpl) = &raw.template {
        let t = decode_image(tpl, limits, "template").map_err(about)?;
        if (t.width, t.height) != (img.width, img.height) {
            return Err(about(Rejection::new(
                "template-size-mismatch",
                format!(
                    "the template is {}x{} but the image is {}x{}",
                    t.width, t.height, img.width, img.height
                ),
            )));
        }
    }
    let labels = match &raw.labels {
        Some(l) => {
            check_labels(l, img.width, img.height, &limits.classes).map_err(about)?;
            Some(
                l.iter()
                    .map(|b| BoxLabel {
                        class: limits.classes[b.class_id as usize - 1].clone(),
                        ..b.clone()
                    })
                    .collect(),
            )
        }
        None => None,
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let by_reference = raw.image_ref.is_some();
    Ok(EncodedImage {
        image_id: raw.image_id.clone(),
        board_id: raw.board_id.clone(),
        line_id: raw.line_id.clone(),
        source: raw.source.clone(),
        captured_at_ms: raw.captured_at_ms,
        encoded_at_ms: now_ms,
        image_b64: if by_reference {
            String::new()
        } else {
            b64.encode(&raw.image)
        },
        width: img.width,
        height: img.height,
        channels: img.channels,
        format: format_name(img.format),
        sha256: actual,
        labels,
        label_format: raw.label_format.clone(),
        template_b64: match &raw.template_ref {
            Some(_) => None,
            None => raw.template.as_ref().map(|t| b64.encode(t)),
        },
        split_hint: raw.split_hint,
        revision: raw.revision.clone(),
        image_ref: raw.image_ref.clone(),
        template_ref: raw.template_ref.clone(),
    })
}

/// Why the stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    /// It could not start, or its consumer stopped.
    #[error("encoder: {0}")]
    Serve(#[from] pcb_common::stage::ServeError),
}

/// Handles one delivery: decode the record, validate, publish, decide the ack.
async fn handle(
    js: async_nats::jetstream::Context,
    files: pcb_common::LazyFiles,
    limits: std::sync::Arc<Limits>,
    d: Delivery,
) -> Outcome {
    let mut raw: RawImage = match d.decode() {
        Ok(r) => r,
        Err(r) => return Outcome::Reject(r),
    };
    // Files kept in the bucket are read back (size and digest checked) and validated like
    // inline ones; a file that is gone is a dead letter, a server that failed a retry.
    let about = |o: Outcome, raw: &RawImage| match o {
        Outcome::Reject(r) => {
            Outcome::Reject(r.about(Some(raw.image_id.clone()), raw.source.clone()))
        }
        other => other,
    };
    if let Some(r) = raw.image_ref.clone() {
        match files.get(&r).await {
            Ok(bytes) => raw.image = bytes,
            Err(e) => return about(e.outcome("reading the image"), &raw),
        }
    }
    if let Some(r) = raw.template_ref.clone() {
        match files.get(&r).await {
            Ok(bytes) => raw.template = Some(bytes),
            Err(e) => return about(e.outcome("reading the template"), &raw),
        }
    }
    let now = pcb_common::now_ms();
    let encoded = match tokio::task::spawn_blocking(move || encode_record(&raw, &limits, now)).await
    {
        Ok(Ok(e)) => e,
        Ok(Err(rejection)) => return Outcome::Reject(rejection),
        Err(e) => return Outcome::Retry(format!("decode task failed: {e}")),
    };
    match pcb_common::publish(&js, SUBJECT_ENCODED.into(), &encoded).await {
        Ok(_) => Outcome::Done,
        Err(e) => e.outcome("publishing the encoded image"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::GrayImage::from_pixel(w, h, image::Luma([200]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("png");
        out.into_inner()
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img =
            image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 7 + y * 3) % 256) as u8]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg)
            .expect("jpeg");
        out.into_inner()
    }

    fn label(x1: f32, y1: f32, x2: f32, y2: f32, class_id: u16) -> BoxLabel {
        BoxLabel::new([x1, y1, x2, y2], class_id, "")
    }

    fn raw(image: Vec<u8>) -> RawImage {
        RawImage {
            image_id: image_id(&image),
            image,
            template: None,
            labels: Some(vec![label(1.0, 2.0, 10.0, 12.0, 3)]),
            label_format: Some("deeppcb".into()),
            board_id: "b1".into(),
            line_id: "l1".into(),
            source: "x/b1_test.jpg".into(),
            captured_at_ms: 1,
            split_hint: None,
            revision: None,
            image_ref: None,
            template_ref: None,
        }
    }

    /// A 64x48 PNG board, changed by `change`.
    fn board(change: impl FnOnce(&mut RawImage)) -> RawImage {
        let mut r = raw(png(64, 48));
        change(&mut r);
        r
    }

    fn reason(r: Result<EncodedImage, Rejection>) -> (String, String) {
        let r = r.expect_err("should be rejected");
        (r.reason_code, r.reason)
    }

    #[test]
    fn files_by_reference_are_validated_and_named_not_carried() {
        let mut r = raw(jpeg(64, 48));
        r.template = Some(jpeg(64, 48));
        r.image_ref = Some(pcb_schemas::ObjectRef::of(&r.image));
        r.template_ref = Some(pcb_schemas::ObjectRef::of(
            r.template.as_deref().unwrap_or_default(),
        ));
        let e = encode_record(&r, &Limits::default(), 9).expect("encoded");
        assert_eq!((e.width, e.height), (64, 48));
        assert!(e.image_b64.is_empty());
        assert_eq!(e.template_b64, None);
        assert_eq!(e.image_ref, r.image_ref);
        assert_eq!(e.template_ref, r.template_ref);
        assert!(e.has_template());
        // The bytes read back are still decoded in full: a bad file is refused as inline.
        r.image = b"not an image".to_vec();
        r.image_id = image_id(&r.image);
        assert_eq!(
            reason(encode_record(&r, &Limits::default(), 9)).0,
            "not-an-image"
        );
    }

    #[test]
    fn good_record_is_encoded_with_class_names() {
        let mut r = raw(jpeg(64, 48));
        r.template = Some(jpeg(64, 48));
        let e = encode_record(&r, &Limits::default(), 9).expect("encoded");
        assert_eq!((e.width, e.height, e.channels), (64, 48, 1));
        assert_eq!(e.format, "jpeg");
        assert_eq!(e.sha256, r.image_id);
        let back = base64::engine::general_purpose::STANDARD
            .decode(&e.image_b64)
            .expect("base64");
        assert_eq!(back, r.image);
        assert!(e.template_b64.is_some());
        assert_eq!(e.labels.expect("labels")[0].class, "mousebite");
        assert_eq!(e.encoded_at_ms, 9);
    }

    #[test]
    fn each_bad_input_gets_a_precise_reason() {
        let l = Limits::default();
        let good = jpeg(64, 48);
        let cases: Vec<(RawImage, &str, &str)> = vec![
            (raw(vec![]), "empty-file", "empty"),
            (
                raw(b"hello, I am text".to_vec()),
                "not-an-image",
                "not an image",
            ),
            (
                raw(good[..good.len() / 2].to_vec()),
                "truncated-image",
                "truncated",
            ),
            (
                board(|r| r.labels = Some(vec![label(60.0, 2.0, 70.0, 12.0, 1)])),
                "label-outside-image",
                "outside the 64x48 image",
            ),
            (
                board(|r| r.labels = Some(vec![label(10.0, 2.0, 5.0, 12.0, 1)])),
                "label-degenerate",
                "x1 < x2",
            ),
            (
                board(|r| r.labels = Some(vec![label(1.0, 2.0, 5.0, 12.0, 7)])),
                "unknown-class",
                "unknown class id 7",
            ),
            (
                board(|r| {
                    r.labels = Some(vec![BoxLabel {
                        class: "scratch".into(),
                        ..label(1.0, 2.0, 5.0, 12.0, 0)
                    }])
                }),
                "unknown-class",
                "\"scratch\"",
            ),
            (
                board(|r| r.template = Some(png(32, 32))),
                "template-size-mismatch",
                "32x32 but the image is 64x48",
            ),
            (
                board(|r| r.template = Some(b"junk".to_vec())),
                "not-an-image",
                "template",
            ),
            (
                board(|r| r.image_id = "00".into()),
                "image-id-mismatch",
                "not the sha256",
            ),
        ];
        for (r, code, needle) in cases {
            let (c, text) = reason(encode_record(&r, &l, 0));
            assert_eq!(c, code, "{text}");
            assert!(text.contains(needle), "{code}: {text:?} lacks {needle:?}");
        }
    }

    /// `jpeg` with 16 bytes in the middle of its scan data replaced by runs of 1 bits
    /// (stuffed 0xFF bytes) longer than any Huffman code of the standard tables.
    fn corrupt_scan(w: u32, h: u32) -> Vec<u8> {
        let mut bytes = jpeg(w, h);
        let sos = bytes
            .windows(2)
            .position(|m| m == [0xFF, 0xDA])
            .expect("a start-of-scan marker");
        let mid = sos + (bytes.len() - sos) / 2;
        for (i, b) in bytes[mid..mid + 16].iter_mut().enumerate() {
            *b = if i % 2 == 0 { 0xFF } else { 0x00 };
        }
        bytes
    }

    #[test]
    fn damaged_scan_data_is_refused_though_a_lenient_decoder_fills_it_in() {
        let bytes = corrupt_scan(256, 192);
        assert!(
            image::load_from_memory(&bytes).is_ok(),
            "the image crate decodes it without a word: why the encoder decodes strictly"
        );
        let (code, text) = reason(encode_record(&raw(bytes), &Limits::default(), 0));
        assert_eq!(code, "corrupt-image", "{text}");
        assert!(text.contains("has corrupt data"), "{text}");
        // The template too.
        let mut r = raw(jpeg(256, 192));
        r.labels = None;
        r.template = Some(corrupt_scan(256, 192));
        let (code, text) = reason(encode_record(&r, &Limits::default(), 0));
        assert_eq!(code, "corrupt-image", "{text}");
        assert!(text.contains("template"), "{text}");
    }

    #[test]
    fn oversized_dimensions_are_refused_before_decoding() {
        let l = Limits {
            max_width: 32,
            max_height: 32,
            ..Limits::default()
        };
        let (code, text) = reason(encode_record(&raw(png(64, 48)), &l, 0));
        assert_eq!(code, "too-large");
        assert!(
            text.contains("64x48 pixels, over the limit of 32x32"),
            "{text}"
        );
    }

    #[test]
    fn alloc_limit_refuses_a_bomb() {
        // 4000x4000 grey = 16 MB decoded from a tiny PNG.
        let l = Limits {
            max_alloc_bytes: 1 << 20,
            ..Limits::default()
        };
        let (code, text) = reason(encode_record(&raw(png(4000, 4000)), &l, 0));
        assert_eq!(code, "too-large", "{text}");
    }

    #[test]
    fn unlabelled_images_pass_without_labels() {
        let mut r = raw(png(8, 8));
        r.labels = None;
        let e = encode_record(&r, &Limits::default(), 0).expect("encoded");
        assert!(e.labels.is_none());
        assert_eq!(e.format, "png");
    }

    #[test]
    fn config_problems_are_reported_together() {
        let mut f = FileConfig::default();
        f.stage.settings.max_width = 0;
        f.stage.settings.classes.clear();
        f.nats.url.clear();
        assert_eq!(
            f.validate().unwrap_err().keys(),
            ["nats.url", "encoder.max_width", "encoder.classes"]
        );
    }

    #[test]
    fn unknown_key_in_file_names_key_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("encoder.toml");
        std::fs::write(&path, "[encoder]\nmax_widht = 10\n").expect("write");
        let text = FileConfig::load(Some(&path)).unwrap_err().to_string();
        assert!(
            text.contains("max_widht") && text.contains("encoder.toml"),
            "{text}"
        );
    }
}
