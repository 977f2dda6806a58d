//! NMS and RoI align against torchvision's own ops on random cases (inputs and answers in
//! `tests/parity/golden_ops.json`, written by `tests/parity/make_golden.py`).

use pcb_vision::ops;
use pcb_vision::testing::{json_floats, json_ints};
use serde_json::Value;
use tch::Tensor;

fn cases() -> Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/golden_ops.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden JSON")
}

/// The numbers of `v` as the f32 inputs and outputs of the ops.
fn f32s(v: &Value) -> Vec<f32> {
    let values = json_floats(v).expect("numbers");
    values.into_iter().map(|x| x as f32).collect()
}

#[test]
fn nms_matches_torchvision_on_random_boxes() {
    let all = cases();
    let list = all["nms"].as_array().expect("nms cases");
    assert!(!list.is_empty());
    for (i, c) in list.iter().enumerate() {
        let boxes = Tensor::from_slice(&f32s(&c["boxes"])).view([-1, 4]);
        let scores = Tensor::from_slice(&f32s(&c["scores"]));
        let keep = ops::nms(&boxes, &scores, c["iou"].as_f64().expect("iou"));
        let got = Vec::<i64>::try_from(&keep).expect("keep");
        assert_eq!(got, json_ints(&c["keep"]).expect("keep"), "case {i}");
    }
}

#[test]
fn roi_align_matches_torchvision_on_random_rois() {
    let all = cases();
    let list = all["roi_align"].as_array().expect("roi_align cases");
    assert!(!list.is_empty());
    let mut worst: f64 = 0.0;
    for (i, c) in list.iter().enumerate() {
        let shape = json_ints(&c["shape"]).expect("shape");
        let input = Tensor::from_slice(&f32s(&c["input"])).view(shape.as_slice());
        let rois = Tensor::from_slice(&f32s(&c["rois"])).view([-1, 5]);
        let out = ops::roi_align(
            &input,
            &rois,
            (7, 7),
            c["scale"].as_f64().expect("scale"),
            c["sampling_ratio"].as_i64().expect("ratio"),
            c["aligned"].as_bool().expect("aligned"),
        );
        let got = Vec::<f32>::try_from(&out.reshape([-1])).expect("output");
        let want = f32s(&c["output"]);
        assert_eq!(got.len(), want.len(), "case {i}: size");
        for (j, (a, b)) in got.iter().zip(&want).enumerate() {
            let d = (a - b).abs() as f64;
            worst = worst.max(d);
            assert!(d <= 1e-5, "case {i} value {j}: ours {a}, torchvision {b}");
        }
    }
    eprintln!(
        "roi_align: worst absolute difference {worst:.2e} over {} cases",
        list.len()
    );
}

#[test]
fn roi_align_passes_gradients_to_its_input() {
    let input =
        Tensor::rand([1, 2, 8, 8], (tch::Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let rois = Tensor::from_slice(&[0f32, 1., 1., 6., 5.]).view([1, 5]);
    let out = ops::roi_align(&input, &rois, (3, 3), 1.0, 2, false);
    out.sum(tch::Kind::Float).backward();
    let g = input.grad();
    assert!(g.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0);
    // Samples lie inside the box, so pixels far outside it get no gradient.
    assert_eq!(g.get(0).get(0).get(7).get(7).double_value(&[]), 0.0);
}

#[test]
fn roi_align_gradient_is_the_adjoint_of_its_forward() {
    // RoI align is linear in its input, so for any output weights g the gradient of
    // sum(g * out) must satisfy <out, g> = <input, grad>: the backward pass is the exact
    // transpose of the forward one, which the golden cases check against torchvision.
    tch::manual_seed(7);
    let opts = (tch::Kind::Double, tch::Device::Cpu);
    let input = Tensor::randn([2, 3, 9, 11], opts).set_requires_grad(true);
    let rois = Tensor::from_slice(&[
        0f64, 1., 1., 6., 5., // inside
        1., -3., -2., 4., 3., // past the top-left border
        0., 7.5, 4.5, 12., 10., // past the bottom-right border
        1., 2.2, 3.7, 2.4, 3.9, // smaller than a pixel
    ])
    .view([4, 5]);
    for aligned in [false, true] {
        let out = ops::roi_align(&input, &rois, (3, 2), 0.8, 2, aligned);
        let g = Tensor::randn(out.size(), opts);
        let forward = (&out * &g).sum(tch::Kind::Double);
        let grad = Tensor::run_backward(&[&forward], &[&input], false, false);
        let left = forward.double_value(&[]);
        let right = (&input * &grad[0]).sum(tch::Kind::Double).double_value(&[]);
        assert!(left.abs() > 1e-3, "aligned {aligned}: empty output");
        assert!(
            (left - right).abs() <= 1e-9 * left.abs().max(1.0),
            "aligned {aligned}: <out, g> {left} vs <input, grad> {right}"
        );
    }
}
