//! Renders one synthetic board to PNG files for eyeballing: `<prefix>_test.png`,
//! `<prefix>_temp.png` and `<prefix>_boxes.png` (test image with the defect boxes outlined).
//!
//! Usage: `cargo run -p pcb-synth --example render_board -- <seed> <index> <prefix> [size]`

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: render_board <seed> <index> <prefix> [size]");
        return ExitCode::FAILURE;
    }
    let (Ok(seed), Ok(index)) = (args[1].parse::<u64>(), args[2].parse::<u64>()) else {
        eprintln!("seed and index must be integers");
        return ExitCode::FAILURE;
    };
    let size = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(640);
    let prefix = &args[3];
    let board = pcb_synth::render_board(seed, index, size);
    // Mid grey outlines stay visible on both copper and substrate.
    let mut boxes = board.test.clone();
    for d in &board.defects {
        for x in d.x1..=d.x2 {
            boxes.put_pixel(x, d.y1, image::Luma([128]));
            boxes.put_pixel(x, d.y2, image::Luma([128]));
        }
        for y in d.y1..=d.y2 {
            boxes.put_pixel(d.x1, y, image::Luma([128]));
            boxes.put_pixel(d.x2, y, image::Luma([128]));
        }
        println!(
            "{} {} {} {} {} ({}, {}x{})",
            d.x1,
            d.y1,
            d.x2,
            d.y2,
            d.class_id,
            d.class_name(),
            d.x2 - d.x1 + 1,
            d.y2 - d.y1 + 1
        );
    }
    for (suffix, img) in [
        ("test", &board.test),
        ("temp", &board.template),
        ("boxes", &boxes),
    ] {
        let path = format!("{prefix}_{suffix}.png");
        if let Err(e) = img.save(&path) {
            eprintln!("cannot write {path}: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
