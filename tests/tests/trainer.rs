//! Trainer ranks as real processes over a real nats-server: replicas bitwise identical
//! after every step, equal to one rank with the same global batch, a killed rank named
//! and the job resumed, uneven (and empty) shards completing with every image once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pcb_schemas::{decode, TrainCandidate, TrainProgress, STREAM_SHARDS, STREAM_TRAINING};
use pcb_tests::{bin, wait_until, Env};
use tch::Tensor;

/// Boards small enough for a CPU test: 128 px, a ResNet-18 FPN with 16 channels.
const SIZE: u32 = 128;

/// Routes `count` synthetic boards into the shard streams with `shard_count` shards; returns
/// the number of labelled training and validation records.
async fn feed(env: &Env, count: usize, shard_count: u32, val_fraction: f64) -> (u64, u64) {
    let boards = env.dir.path().join("boards");
    pcb_tests::synth_sized(&boards, count, 11, SIZE, val_fraction);
    let shutdown = pcb_common::Shutdown::new();
    let h1 = env.spawn_stage::<pcb_encoder::Encoder>("", &shutdown);
    let h2 = env.spawn_stage::<pcb_router::Router>(
        &format!("[router]\nshard_count = {shard_count}\n"),
        &shutdown,
    );
    env.import(&boards).await;
    let routed = env
        .wait_count(
            STREAM_SHARDS,
            "pcb.shards.",
            count as u64,
            Duration::from_secs(120),
        )
        .await;
    shutdown.trigger();
    let _ = h1.await;
    let _ = h2.await;
    assert!(routed, "the router did not route {count} boards");
    let mut train = 0;
    let mut val = 0;
    for (_, payload) in env.read_all(STREAM_SHARDS, "pcb.shards.>").await {
        let rec: pcb_schemas::ShardRecord = decode(&payload, None).expect("shard record");
        match rec.split {
            pcb_schemas::Split::Train => train += 1,
            pcb_schemas::Split::Val => val += 1,
        }
    }
    (train, val)
}

/// The config file of one rank.
#[allow(clippy::too_many_arguments)]
fn rank_config(
    env: &Env,
    job: &str,
    rank: usize,
    world: usize,
    port: u16,
    shard_count: u32,
    batch: usize,
    epochs: usize,
    extra: &str,
) -> PathBuf {
    let out = env.dir.path().join("jobs");
    let text = format!(
        "[trainer]\njob = {job:?}\nrank = {rank}\nworld_size = {world}\nmaster_addr = \"127.0.0.1\"\n\
         master_port = {port}\ntimeout_secs = 20\nout_dir = {out:?}\nshard_count = {shard_count}\n\
         threads = 1\nparam_digest = true\nsampling = \"first\"\n{extra}\n\
         [trainer.model]\nbackbone = \"r18\"\nnorm = \"frozen\"\ninput = \"image_template_diff\"\n\
         fpn_channels = 16\nbox_batch_size_per_image = 32\n\
         [trainer.model.transform]\nmin_size = 0\n\
         [trainer.optim]\noptimizer = \"sgd\"\nlr = 0.001\nmomentum = 0.9\nepochs = {epochs}\n\
         lr_step_epochs = 10\nbatch_size = {batch}\naugment = false\ncrop = 0\n",
        out = out.display().to_string()
    );
    env.config_file(&format!("{job}-{rank}.toml"), &text)
}

fn spawn_rank(config: &Path, log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log");
    Command::new(bin("trainer"))
        .arg("--config")
        .arg(config)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("MASTER_ADDR")
        .env_remove("MASTER_PORT")
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .expect("spawn trainer")
}

/// Starts `world` ranks of `job`; returns them with their logs.
fn start_job(
    env: &Env,
    job: &str,
    world: usize,
    shard_count: u32,
    batch: usize,
    epochs: usize,
    extra: &str,
) -> Vec<(Child, PathBuf)> {
    let port = pcb::server::free_port().expect("port");
    (0..world)
        .map(|r| {
            let config = rank_config(env, job, r, world, port, shard_count, batch, epochs, extra);
            let log = env.dir.path().join(format!("{job}-{r}.log"));
            (spawn_rank(&config, &log), log)
        })
        .collect()
}

/// Waits for every rank; panics with the failed ranks' logs when one fails or hangs.
fn wait_all(ranks: &mut [(Child, PathBuf)], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut failures = Vec::new();
    for (rank, (child, log)) in ranks.iter_mut().enumerate() {
        let status = loop {
            match child.try_wait().expect("wait") {
                Some(status) => break Some(status),
                None if Instant::now() > deadline => {
                    let _ = child.kill();
                    break None;
                }
                None => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        if status.map(|s| !s.success()).unwrap_or(true) {
            failures.push(format!(
                "rank {rank} {}:\n{}",
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "hung".into()),
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Subscribes to `pcb.train.progress` and waits up to `timeout` for a step that `wanted`
/// accepts; returns whether one came.
async fn wait_for_step(
    env: &Env,
    timeout: Duration,
    wanted: impl Fn(&TrainProgress) -> bool,
) -> bool {
    use futures::StreamExt;
    let mut live = env
        .client
        .subscribe("pcb.train.progress")
        .await
        .expect("subscribe");
    tokio::time::timeout(timeout, async {
        while let Some(m) = live.next().await {
            if decode::<TrainProgress>(&m.payload, None).is_ok_and(|p| wanted(&p)) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

async fn progress_of(env: &Env, job: &str) -> Vec<TrainProgress> {
    env.read_all(STREAM_TRAINING, "pcb.train.progress")
        .await
        .into_iter()
        .map(|(_, p)| decode::<TrainProgress>(&p, None).expect("progress"))
        .filter(|p| p.job == job)
        .collect()
}

async fn candidate_of(env: &Env, job: &str) -> TrainCandidate {
    env.read_all(STREAM_TRAINING, "pcb.train.candidates")
        .await
        .into_iter()
        .map(|(_, p)| decode::<TrainCandidate>(&p, None).expect("candidate"))
        .find(|c| c.job == job)
        .unwrap_or_else(|| panic!("job {job} offered no candidate"))
}

/// Images of the steps of `epoch`, job-wide, as rank 0 reported them.
fn images_in_epoch(progress: &[TrainProgress], epoch: u32) -> u64 {
    progress
        .iter()
        .filter(|p| p.rank == 0 && p.epoch == epoch && p.param_digest.is_some())
        .map(|p| u64::from(p.images))
        .sum()
}

/// A candidate's weights, from the candidates' object store it names them in.
async fn weights(env: &Env, c: &TrainCandidate) -> BTreeMap<String, Tensor> {
    use tokio::io::AsyncReadExt;
    let store = env
        .js
        .get_object_store(pcb_schemas::OBJECTS_CANDIDATES)
        .await
        .expect("candidates' object store");
    let mut object = store
        .get(&c.artifact)
        .await
        .expect("the candidate's object");
    let mut bytes = Vec::new();
    object
        .read_to_end(&mut bytes)
        .await
        .expect("read the object");
    let path = env.dir.path().join(format!("{}.safetensors", c.job));
    std::fs::write(&path, &bytes).expect("write weights");
    Tensor::read_safetensors(&path)
        .expect("read weights")
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ranks_stay_bitwise_identical_and_match_one_rank_with_the_same_global_batch() {
    let env = Env::start().await;
    let (train, val) = feed(&env, 10, 4, 0.2).await;
    assert!(train >= 6 && val >= 1, "train {train}, val {val}");

    // Two ranks, each taking its whole share per step (batch 8 ≥ share): every step's
    // global batch is the whole training set, as it is for one rank with batch 8.
    let mut two = start_job(&env, "two", 2, 4, 8, 3, "");
    tokio::task::block_in_place(|| wait_all(&mut two, Duration::from_secs(600)));
    // The comparison with one rank covers one step: after it, the replicas differ from
    // the single process by summation order only (1e-7), but the next step's proposals
    // go through NMS and top-k, whose near-ties such differences can flip, so later steps
    // are compared only between the replicas themselves (bitwise, above).
    let mut two1 = start_job(&env, "two1", 2, 4, 8, 1, "eval = false");
    tokio::task::block_in_place(|| wait_all(&mut two1, Duration::from_secs(600)));
    let mut one = start_job(&env, "one", 1, 4, 8, 1, "eval = false");
    tokio::task::block_in_place(|| wait_all(&mut one, Duration::from_secs(600)));

    let progress = progress_of(&env, "two").await;
    let mut by_step: BTreeMap<u64, BTreeMap<u32, String>> = BTreeMap::new();
    for p in progress.iter().filter(|p| p.param_digest.is_some()) {
        by_step
            .entry(p.global_step)
            .or_default()
            .insert(p.rank, p.param_digest.clone().unwrap_or_default());
    }
    assert_eq!(
        by_step.len(),
        3,
        "one step per epoch for 3 epochs: {by_step:?}"
    );
    for (step, digests) in &by_step {
        assert_eq!(digests.len(), 2, "step {step}: both ranks report");
        assert_eq!(
            digests[&0], digests[&1],
            "step {step}: the replicas' parameters differ"
        );
    }
    let losses: Vec<f64> = progress
        .iter()
        .filter(|p| p.rank == 0 && p.param_digest.is_some())
        .map(|p| p.loss)
        .collect();
    assert!(
        losses.last() < losses.first(),
        "the loss did not fall: {losses:?}"
    );
    assert_eq!(
        images_in_epoch(&progress, 0),
        train,
        "every training image once per epoch"
    );

    let c = candidate_of(&env, "two").await;
    assert_eq!(c.snapshot.train_images, train);
    assert_eq!(c.snapshot.val_images, val);
    assert!(c.metrics.is_some(), "rank 0 evaluated on the val split");
    let loss_of = |p: &[TrainProgress]| {
        p.iter()
            .find(|p| p.rank == 0 && p.param_digest.is_some())
            .map(|p| p.loss)
            .expect("a step")
    };
    let (l2, l1) = (
        loss_of(&progress_of(&env, "two1").await),
        loss_of(&progress_of(&env, "one").await),
    );
    assert!(
        ((l2 - l1) / l1).abs() < 1e-5,
        "job-wide loss of the step: 2 ranks {l2}, 1 rank {l1}"
    );
    let c2 = candidate_of(&env, "two1").await;
    let c1 = candidate_of(&env, "one").await;
    let (w2, w1) = (weights(&env, &c2).await, weights(&env, &c1).await);
    assert_eq!(w2.keys().collect::<Vec<_>>(), w1.keys().collect::<Vec<_>>());
    let mut worst = 0f64;
    for (name, a) in &w2 {
        let b = &w1[name];
        let diff = (a - b).abs().max().double_value(&[]);
        let scale = b.abs().max().double_value(&[]).max(1e-3);
        worst = worst.max(diff / scale);
    }
    println!("largest relative difference 2 ranks vs 1 rank: {worst:e}");
    // On a GPU, convolutions run in TF32 and cuDNN picks its algorithms by batch size, so
    // half batches round differently from a whole one; on the CPU the sums agree to float
    // precision.
    let tolerance = if pcb_vision::cuda::device_count() > 0 {
        1e-2
    } else {
        1e-4
    };
    assert!(
        worst < tolerance,
        "2 ranks and 1 rank with the same global batch differ by {worst:e} (relative)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rank_is_named_and_the_restarted_job_resumes_from_its_checkpoint() {
    let env = Env::start().await;
    let (train, _) = feed(&env, 12, 4, 0.0).await;
    let extra = "eval = false";
    // Batch 2 per rank: several steps per epoch, so the kill lands mid-epoch.
    let mut ranks = start_job(&env, "crash", 2, 4, 2, 3, extra);
    // Kill rank 1 once the second epoch is under way.
    let reached = wait_for_step(&env, Duration::from_secs(300), |p| {
        p.job == "crash" && p.epoch >= 1
    })
    .await;
    assert!(reached, "the job never reached its second epoch");
    ranks[1].0.kill().expect("SIGKILL rank 1");
    let _ = ranks[1].0.wait();
    let killed_at = Instant::now();
    let status = tokio::task::block_in_place(|| loop {
        if let Some(s) = ranks[0].0.try_wait().expect("wait") {
            break Some(s);
        }
        if killed_at.elapsed() > Duration::from_secs(60) {
            let _ = ranks[0].0.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    });
    let log0 = std::fs::read_to_string(&ranks[0].1).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("rank 0 hung after rank 1 died:\n{log0}"));
    assert!(!status.success(), "rank 0 should fail when its peer dies");
    assert!(
        log0.contains("lost peer rank 1"),
        "rank 0's error should name rank 1:\n{log0}"
    );
    println!(
        "rank 0 failed {:.1} s after rank 1 was killed",
        killed_at.elapsed().as_secs_f64()
    );
    let before = progress_of(&env, "crash").await.len();

    let mut again = start_job(&env, "crash", 2, 4, 2, 3, extra);
    tokio::task::block_in_place(|| wait_all(&mut again, Duration::from_secs(600)));
    let after: Vec<TrainProgress> = progress_of(&env, "crash")
        .await
        .into_iter()
        .skip(before)
        .collect();
    let first = after.first().expect("the restarted job reported progress");
    assert!(
        first.epoch >= 1,
        "the restarted job began at epoch {} instead of resuming",
        first.epoch
    );
    let c = candidate_of(&env, "crash").await;
    assert_eq!(c.epoch_losses.len(), 3, "three epochs in all");
    assert_eq!(c.snapshot.train_images, train);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uneven_and_empty_shards_complete_with_every_image_once_per_epoch() {
    let env = Env::start().await;
    // Two shards over three ranks: rank 2 holds no shard at all, and the other two hold
    // whatever the hash gave them.
    let (train, _) = feed(&env, 9, 2, 0.0).await;
    let mut ranks = start_job(&env, "uneven", 3, 2, 2, 3, "eval = false");
    tokio::task::block_in_place(|| wait_all(&mut ranks, Duration::from_secs(600)));
    let progress = progress_of(&env, "uneven").await;
    for epoch in 0..3 {
        assert_eq!(
            images_in_epoch(&progress, epoch),
            train,
            "epoch {epoch}: every image of the snapshot once"
        );
    }
    let ranks_seen: std::collections::BTreeSet<u32> = progress.iter().map(|p| p.rank).collect();
    assert_eq!(
        ranks_seen.len(),
        3,
        "the empty rank took part in every step"
    );
    let c = candidate_of(&env, "uneven").await;
    assert_eq!(c.snapshot.train_images, train);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn images_keep_flowing_to_detections_while_a_job_trains() {
    use pcb_schemas::{EncodedImage, STREAM_DETECTIONS, STREAM_IMAGES};
    use std::collections::BTreeSet;
    let env = Env::start().await;
    let (train, _) = feed(&env, 10, 2, 0.2).await;
    assert!(train >= 6, "train {train}");
    let registry = pcb_registry::Registry::open(&env.js)
        .await
        .expect("registry");
    let v = pcb_tests::register_random_model(&registry, "flow", env.dir.path(), 1).await;
    registry.promote("flow", v, "test").await.expect("promote");
    let (mut det, det_log) = pcb_tests::spawn_detector(&env, "det", "flow");
    // A job far longer than the test: it must still be training when the last new image
    // has been answered.
    let mut ranks = start_job(&env, "flow", 2, 2, 2, 1000, "eval = false");
    let started = wait_for_step(&env, Duration::from_secs(300), |p| p.job == "flow").await;
    assert!(started, "the job reported no step");

    // 40 new boards through ingester → encoder → router, and the detector, meanwhile.
    let (stop, stages) = env.start_encoder_router();
    let boards = env.dir.path().join("more");
    pcb_tests::synth_sized(&boards, 40, 99, SIZE, 0.2);
    let summary = env.import(&boards).await;
    assert_eq!(summary.published, 40, "{summary:?}");
    let total = 10 + 40;
    let flowed = wait_until(Duration::from_secs(300), || async {
        env.count(STREAM_SHARDS, "pcb.shards.").await >= total
            && env.count(STREAM_DETECTIONS, "pcb.detections").await >= total
    })
    .await;
    let detector_log = std::fs::read_to_string(&det_log).unwrap_or_default();
    assert!(
        flowed,
        "not every image reached the shards and the detector:\n{detector_log}"
    );
    for (rank, (child, log)) in ranks.iter_mut().enumerate() {
        let running = child.try_wait().expect("try_wait").is_none();
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            running,
            "rank {rank} stopped before the images flowed:\n{text}"
        );
    }
    // Nothing lost, nothing twice: every encoded image has one shard record and one
    // detection.
    let encoded: BTreeSet<String> = env
        .read_all(STREAM_IMAGES, "pcb.images.encoded")
        .await
        .into_iter()
        .map(|(_, p)| decode::<EncodedImage>(&p, None).expect("encoded").image_id)
        .collect();
    let detections: Vec<String> = env
        .detections()
        .await
        .into_iter()
        .map(|d| d.image_id)
        .collect();
    let detected: BTreeSet<String> = detections.iter().cloned().collect();
    assert_eq!(encoded.len() as u64, total);
    assert_eq!(env.count(STREAM_SHARDS, "pcb.shards.").await, total);
    assert_eq!(detections.len(), detected.len(), "an image answered twice");
    assert_eq!(detected, encoded, "every encoded image answered");
    let steps = progress_of(&env, "flow").await.len();
    println!("{total} images routed and answered while the job took {steps} steps");
    for (child, _) in ranks.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    stop.trigger();
    for h in stages {
        let _ = h.await;
    }
    let _ = det.kill();
}
