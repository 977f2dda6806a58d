//! The pipeline at a steady board rate for a bounded time: once with random faults (the
//! ledger run), once without (the soak). Each ends with a balanced ledger; the soak also
//! checks that no stage's open files or memory grow. CI runs each for 45 s; the README's
//! figures come from the same tests with `PCB_LEDGER_SECS=600` and `PCB_SOAK_SECS=1800`.

use std::time::Duration;

use pcb_tests::soak::{run, RunSpec};
use pcb_tests::up::Pipeline;

fn secs(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Short ack waits, so that a consumer stopped for 8 s is past its own.
const ACK_WAITS: &str = "[stages.encoder.settings]\nack_wait_secs = 5\n\
    [stages.router.settings]\nack_wait_secs = 5\n\
    [stages.detector.settings]\nack_wait_secs = 5\n";

/// Boards dropped at 1 per second into a 3-node cluster while, every 10 s, a random stage
/// or NATS node is SIGKILLed or a consumer is SIGSTOPped for 8 s (past its 5 s ack wait):
/// every board ends with exactly one detection per model version or a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_balances_under_random_faults() {
    let p = Pipeline::up_with(&["--cluster", "3"], ACK_WAITS).await;
    let spec = RunSpec {
        secs: secs("PCB_LEDGER_SECS", 45),
        rate: 1.0,
        fault_every: Some(Duration::from_secs(10)),
        stop_for: Duration::from_secs(8),
        seed: secs("PCB_LEDGER_SEED", 7),
        sample_every: Duration::from_secs(secs("PCB_LEDGER_SAMPLE_SECS", 15)),
        nodes: 3,
    };
    let report = run(&p, &spec).await;
    println!("ledger run, {} s, seed {}:\n{report}", spec.secs, spec.seed);
    assert!(
        report
            .faults
            .iter()
            .filter(|f| !f.contains("resume"))
            .count()
            >= 3,
        "{report}"
    );
    assert!(
        report.settled && report.ledger.balanced(),
        "{report}\n{}",
        p.said()
    );
    assert_eq!(report.ledger.boards, report.boards.len());
}

/// Boards at 2 per second through every stage with the shipped model live: the ledger
/// balances, and from a third of the way in to the end no process's open files grow by
/// more than 16 nor its memory by more than half (plus 64 MiB of allocator slack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_rate_soak_keeps_every_process_flat() {
    let p = Pipeline::up(&[]).await;
    let spec = RunSpec {
        secs: secs("PCB_SOAK_SECS", 45),
        rate: 2.0,
        fault_every: None,
        stop_for: Duration::ZERO,
        seed: 5,
        sample_every: Duration::from_secs(secs("PCB_SOAK_SAMPLE_SECS", 10)),
        nodes: 1,
    };
    let report = run(&p, &spec).await;
    println!("soak, {} s at {} boards/s:\n{report}", spec.secs, spec.rate);
    assert!(
        report.settled && report.ledger.balanced(),
        "{report}\n{}",
        p.said()
    );
    let warm = report
        .samples
        .iter()
        .find(|s| s.at_secs >= spec.secs as f64 / 3.0)
        .expect("a sample past the first third");
    let last = report.samples.last().expect("a final sample");
    assert!(
        warm.procs.len() >= 7,
        "every stage and the server: {report}"
    );
    for p in &last.procs {
        let Some(w) = warm.procs.iter().find(|w| w.name == p.name) else {
            continue;
        };
        assert!(
            p.fds <= w.fds + 16,
            "{}: fds {} -> {}\n{report}",
            p.name,
            w.fds,
            p.fds
        );
        assert!(
            p.rss_kib <= w.rss_kib * 3 / 2 + 64 * 1024,
            "{}: RSS {} -> {} KiB\n{report}",
            p.name,
            w.rss_kib,
            p.rss_kib
        );
    }
}
