//! The encoder's image check, `pcb_encoder::decode_image`: format sniffing by magic bytes,
//! the truncated-JPEG test, the size and allocation limits, the strict JPEG decoder
//! (`decode_jpeg_strict`, zune-jpeg in strict mode) and the `image` crate's PNG/BMP/TIFF
//! decoders under limits. Board images are whatever a scanner or a person dropped in the
//! watched folder: each must be decoded or refused with a `Rejection`, never panic or run
//! out of memory in the encoder.
//!
//! Limits are smaller than the defaults (1024×1024 pixels, 16 MiB) so that an execution
//! stays fast; the paths that refuse an image as too large are the same.
//!
//! Checked besides not panicking: an accepted image has a size within the limits and 1 to 4
//! channels (as `EncodedImage::channels` documents); a refusal carries one of the reason
//! codes `decode_image` gives (the README's list for images, plus `unreadable` and
//! `unsupported-format`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcb_encoder::{decode_image, Limits};

/// The `reason_code`s `decode_image` gives.
const CODES: [&str; 7] = [
    "empty-file",
    "unreadable",
    "not-an-image",
    "too-large",
    "truncated-image",
    "corrupt-image",
    "unsupported-format",
];

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_width: 1024,
        max_height: 1024,
        max_alloc_bytes: 16 << 20,
        ..Limits::default()
    };
    match decode_image(data, &limits, "image") {
        Ok(d) => {
            assert!(d.width >= 1 && d.width <= limits.max_width, "{d:?}");
            assert!(d.height >= 1 && d.height <= limits.max_height, "{d:?}");
            assert!((1..=4).contains(&d.channels), "{d:?}");
        }
        Err(r) => {
            assert!(
                CODES.contains(&r.reason_code.as_str()),
                "undocumented reason code {}: {}",
                r.reason_code,
                r.reason
            );
            assert!(!r.reason.is_empty());
        }
    }
});
