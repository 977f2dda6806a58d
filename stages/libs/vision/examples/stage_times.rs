//! Seconds per stage of one inference (transform, body, FPN, RPN, box head, post-processing)
//! on the bench's deterministic weights: where the time of `pcb bench vision`'s rows goes.
//!
//! `cargo run --release -p pcb-vision --example stage_times -- r50 bf16 5 [plain]`
//! (`plain`: libtorch's own convolutions instead of oneDNN's fused kernels, for an A/B).

use pcb_vision::{testing, Detector, InferenceOptions, Sampling};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).map(String::as_str).unwrap_or("r50");
    let bf16 = args.get(2).map(String::as_str) == Some("bf16");
    let iters: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let fused = args.get(4).map(String::as_str) != Some("plain");
    tch::set_num_threads(2);
    // As pcb, the detector and the trainer run.
    eprintln!("{}", pcb_vision::heap::keep_freed_buffers());
    let size = 640;
    let shape = testing::BenchModel::parse(model).ok_or("model: r50, r18 or compact")?;
    let config = shape.config(size);
    let mut det = Detector::new(config, tch::Device::Cpu, Sampling::Random);
    testing::fill(&mut det)?;
    det.model.prepare_inference(InferenceOptions {
        fold_bn: true,
        channels_last: true,
        bf16,
        bf16_train: false,
        fused,
    });
    let img = testing::image("bench", size, size);
    let m = &det.model;
    let mut t = [0f64; 9];
    for i in 0..=iters {
        tch::no_grad(|| -> Result<(), Box<dyn std::error::Error>> {
            let mut clock = Instant::now();
            let mut lap = |k: usize, t: &mut [f64; 9]| {
                if i > 0 {
                    t[k] += clock.elapsed().as_secs_f64();
                }
                clock = Instant::now();
            };
            let batch = m.config.transform.apply(std::slice::from_ref(&img), None)?;
            lap(0, &mut t);
            let x = pcb_vision::resnet::to_channels_last(&batch.images);
            let x = if bf16 {
                x.to_kind(tch::Kind::BFloat16)
            } else {
                x
            };
            let c = m.body.forward_t(&x, false);
            lap(1, &mut t);
            let features = m.fpn.forward_t(&c, false);
            lap(2, &mut t);
            std::hint::black_box(m.rpn.head.forward_t(&features, false));
            lap(8, &mut t);
            let s = batch.images.size();
            let rpn = m
                .rpn
                .forward((s[2], s[3]), &batch.sizes, &features, None, false);
            lap(3, &mut t);
            let pooled = m
                .roi_heads
                .pool
                .forward(&features[..4], &rpn.proposals, &batch.sizes);
            lap(4, &mut t);
            let x = m.roi_heads.head.forward_t(&pooled, false);
            lap(5, &mut t);
            let logits = x.apply(&m.roi_heads.predictor.cls_score);
            let deltas = x.apply(&m.roi_heads.predictor.bbox_pred);
            lap(6, &mut t);
            let d = m
                .roi_heads
                .postprocess(&logits, &deltas, &rpn.proposals, &batch.sizes);
            std::hint::black_box(d);
            lap(7, &mut t);
            Ok(())
        })?;
    }
    let names = [
        "transform",
        "body",
        "fpn",
        "rpn",
        "roi pool",
        "fc6+fc7",
        "predictor",
        "postprocess",
        "(rpn head)",
    ];
    let total: f64 = t[..8].iter().sum::<f64>() / iters as f64;
    for (n, v) in names.iter().zip(t) {
        println!(
            "{model} {} {n:12} {:.4}",
            if bf16 { "bf16" } else { "f32" },
            v / iters as f64
        );
    }
    println!("{model} total {total:.4}");
    Ok(())
}
