//! Training and evaluation end to end on a tiny DeepPCB-layout folder written by the test:
//! losses fall on a board seen repeatedly, an interrupted run resumes where it stopped, and
//! evaluation produces a report.

use std::path::Path;

use pcb_vision::data::read_list;
use pcb_vision::evaluate::{evaluate, DEEPPCB_CLASSES};
use pcb_vision::stability::SpikeGuardConfig;
use pcb_vision::train::{checkpoint_paths, train, RunState, TrainConfig};
use pcb_vision::{Depth, Detector, InputMode, ModelConfig, Norm, Sampling, Transform};

/// Writes `n` boards of 96x96 with one bright square defect each and a list file.
fn write_boards(root: &Path, n: usize) {
    let dir = root.join("group1/1");
    let not = root.join("group1/1_not");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&not).unwrap();
    let mut list = String::new();
    for i in 0..n {
        let id = format!("{:05}", i);
        let template = image::GrayImage::from_pixel(96, 96, image::Luma([40]));
        let mut board = template.clone();
        let (x, y) = (10 + (i as u32 * 17) % 50, 20 + (i as u32 * 11) % 40);
        for dy in 0..24 {
            for dx in 0..24 {
                board.put_pixel(x + dx, y + dy, image::Luma([230]));
            }
        }
        board.save(dir.join(format!("{id}_test.jpg"))).unwrap();
        template.save(dir.join(format!("{id}_temp.jpg"))).unwrap();
        std::fs::write(
            not.join(format!("{id}.txt")),
            format!("{x} {y} {} {} {}\n", x + 24, y + 24, 1 + i % 6),
        )
        .unwrap();
        list.push_str(&format!("group1/1/{id}.jpg group1/1_not/{id}.txt\n"));
    }
    std::fs::write(root.join("list.txt"), list).unwrap();
}

fn config() -> ModelConfig {
    ModelConfig {
        num_classes: 7,
        backbone: Depth::R18,
        norm: Norm::Batch,
        input: InputMode::ImageTemplateDiff,
        transform: Transform {
            min_size: 96,
            max_size: 96,
            ..Transform::default()
        },
        fpn_channels: 64,
        box_batch_size_per_image: 512,
        backbone_width: 64,
        representation_size: 1024,
        test_proposals: 1000,
    }
}

#[test]
fn train_resume_and_evaluate() {
    let tmp = tempfile::tempdir().unwrap();
    write_boards(tmp.path(), 4);
    let files = read_list(tmp.path(), &tmp.path().join("list.txt")).unwrap();
    assert_eq!(files.len(), 4);
    let out = tmp.path().join("run");
    let cfg = TrainConfig {
        lr: 1e-4,
        epochs: 2,
        batch_size: 2,
        ..TrainConfig::default()
    };
    tch::manual_seed(0);
    let mut det = Detector::new(config(), tch::Device::Cpu, Sampling::Random);
    let mut seen = Vec::new();
    let state = train(&mut det, &files, &cfg, &out, |p| seen.push(p.clone())).unwrap();
    assert_eq!(state.epochs_done, 2);
    assert_eq!(state.step, 4);
    assert_eq!(seen.len(), 4, "one progress report per step");
    assert!(seen
        .iter()
        .all(|p| p.loss.is_finite() && p.images_per_sec > 0.0));
    let (model, optim, json) = checkpoint_paths(&out);
    assert!(model.exists() && optim.exists() && json.exists());

    // A longer run in the same folder resumes after epoch 2 instead of starting again.
    let cfg4 = TrainConfig {
        epochs: 3,
        ..cfg.clone()
    };
    let mut det2 = Detector::new(config(), tch::Device::Cpu, Sampling::Random);
    let mut steps = 0;
    let state = train(&mut det2, &files, &cfg4, &out, |_| steps += 1).unwrap();
    assert_eq!(steps, 2, "only the third epoch ran");
    assert_eq!(state.epochs_done, 3);
    assert_eq!(state.step, 6, "optimizer step count carried over");
    let saved: RunState = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(saved.epoch_losses.len(), 3);

    // Evaluation runs over the boards and reports every class.
    let (report, results) = evaluate(&det2, &files, &DEEPPCB_CLASSES, |_| {}).unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!(report.images, 4);
    assert_eq!(report.classes.len(), 6);
    assert!(report.images_per_sec.unwrap_or(0.0) > 0.0);
    assert!(report.table().contains("mousebite"));
}

#[test]
fn a_missing_list_or_bad_labels_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let e = read_list(tmp.path(), &tmp.path().join("nope.txt"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.txt"), "{e}");
    write_boards(tmp.path(), 1);
    std::fs::write(tmp.path().join("group1/1_not/00000.txt"), "1 2 x 4 1\n").unwrap();
    let e = read_list(tmp.path(), &tmp.path().join("list.txt"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("00000.txt line 1"), "{e}");
}

#[test]
fn a_loss_spike_goes_back_to_the_last_checkpoint_with_a_lower_learning_rate() {
    let tmp = tempfile::tempdir().unwrap();
    write_boards(tmp.path(), 4);
    let files = read_list(tmp.path(), &tmp.path().join("list.txt")).unwrap();
    let out = tmp.path().join("run");
    // One quiet epoch makes the checkpoint to go back to.
    let quiet = TrainConfig {
        lr: 1e-5,
        epochs: 1,
        batch_size: 1,
        warmup_steps: 0,
        lr_step_epochs: 100,
        spike: SpikeGuardConfig {
            factor: 1.5,
            window_steps: 1,
            lr_factor: 0.5,
            max_recoveries: 2,
        },
        ..TrainConfig::default()
    };
    tch::manual_seed(0);
    let mut det = Detector::new(config(), tch::Device::Cpu, Sampling::Random);
    train(&mut det, &files, &quiet, &out, |_| {}).unwrap();
    let (model, _, json) = checkpoint_paths(&out);
    let good = std::fs::read(&model).unwrap();
    // Then a learning rate that blows the loss up at once, without clipping: every retry
    // at half of it blows up too, so the run ends after the allowed recoveries.
    let wild = TrainConfig {
        lr: 1e4,
        epochs: 2,
        clip_grad_norm: 0.0,
        ..quiet.clone()
    };
    let mut recoveries = Vec::new();
    let err = train(&mut det, &files, &wild, &out, |p| {
        if let Some(r) = &p.recovery {
            recoveries.push(r.clone());
        }
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("after 2 recoveries"), "{err}");
    let saved: RunState = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(saved.epochs_done, 1, "never past the good epoch");
    assert_eq!(saved.recoveries.len(), 2);
    assert!(saved.recoveries.iter().all(|r| r.epoch == 1));
    assert_eq!(saved.recoveries[0].lr_scale, 0.5);
    assert_eq!(saved.recoveries[1].lr_scale, 0.25);
    assert_eq!(saved.recoveries[0].reference, saved.epoch_losses[0]);
    // Each recovery is reported with the first step after it (which trips the guard
    // again: the restored weights are fine, the step they take is not). The reported ones
    // go through the same JSON write and read as the saved ones: serde_json's default
    // float parser may miss the last bit of a loss like 1.12e35.
    let reported: Vec<pcb_vision::stability::Recovery> =
        serde_json::from_str(&serde_json::to_string(&recoveries).unwrap()).unwrap();
    assert_eq!(reported, saved.recoveries);
    // The weights on disk are still the good epoch's, bit for bit, and a model loaded
    // after the failure is that one too.
    assert_eq!(std::fs::read(&model).unwrap(), good);
    let mut again = Detector::new(config(), tch::Device::Cpu, Sampling::Random);
    again.load(&model).unwrap();
    for (name, t) in again.vs.variables() {
        let now = &det.vs.variables()[&name];
        assert!(
            t.equal(now),
            "{name}: the model in memory was restored to the checkpoint"
        );
    }
}
