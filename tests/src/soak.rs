//! A bounded run of the whole pipeline at a steady board rate, optionally with random faults
//! (a stage or a NATS node SIGKILLed, a consumer SIGSTOPped past its ack wait), sampling
//! each process's memory and open files and each durable consumer's lag on the way, and
//! settling the ledger at the end. `tests/tests/soak.rs` runs it briefly; the long runs in
//! the README are the same code with `PCB_SOAK_SECS` / `PCB_LEDGER_SECS` set.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::up::Pipeline;
use crate::{pids_with_arg, Ledger};

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Seconds of dropping boards.
    pub secs: u64,
    /// Boards per second.
    pub rate: f64,
    /// Inject a random fault every this many seconds (None: no faults).
    pub fault_every: Option<Duration>,
    /// How long a SIGSTOPped consumer stays stopped (past its ack wait).
    pub stop_for: Duration,
    /// Seed of the fault choices.
    pub seed: u64,
    /// Sample processes and consumers every this often.
    pub sample_every: Duration,
    /// NATS nodes (1, or a cluster's 3).
    pub nodes: usize,
}

/// One process's footprint.
#[derive(Debug, Clone)]
pub struct Proc {
    /// `encoder`, `nats-n1`, ...
    pub name: String,
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: usize,
}

/// One durable consumer's state.
#[derive(Debug, Clone)]
pub struct Lag {
    /// The durable.
    pub durable: String,
    /// Messages not yet delivered.
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: u64,
    /// Messages delivered more than once so far.
    pub redelivered: u64,
}

/// One sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since the start.
    pub at_secs: f64,
    /// Boards dropped so far.
    pub dropped: usize,
    /// Every process.
    pub procs: Vec<Proc>,
    /// Every durable consumer (empty when the server did not answer).
    pub lags: Vec<Lag>,
}

/// What a run saw.
#[derive(Debug)]
pub struct RunReport {
    /// Boards dropped.
    pub boards: BTreeSet<String>,
    /// Whether every board was accounted for before the deadline.
    pub settled: bool,
    /// The final ledger.
    pub ledger: Ledger,
    /// The faults injected, as `t=12.0s kill encoder`.
    pub faults: Vec<String>,
    /// The samples, in order.
    pub samples: Vec<Sample>,
    /// Seconds from the last board dropped to the ledger settling.
    pub drain_secs: f64,
}

/// A small deterministic generator for fault choices (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

/// The stages `pcb up` runs (one replica each here), from the topology.
fn stages() -> Vec<&'static str> {
    pcb::pipeline::services().map(|s| s.name()).collect()
}

/// The stages among them whose durable reads the boards (`PCB_IMAGES`): the ones a SIGSTOP
/// past their ack wait holds boards from.
fn consumers() -> Vec<&'static str> {
    pcb::pipeline::services()
        .filter(|s| {
            s.decl()
                .durable_input()
                .is_some_and(|(i, _)| i.stream == pcb_schemas::StreamKind::Images)
        })
        .map(|s| s.name())
        .collect()
}

fn pid_of(needle: &Path) -> Option<i32> {
    pids_with_arg(&needle.display().to_string())
        .into_iter()
        .next()
}

fn stage_config(p: &Pipeline, stage: &str) -> PathBuf {
    p.data.join("run").join(format!("{stage}-0.toml"))
}

fn node_config(p: &Pipeline, nodes: usize, i: usize) -> PathBuf {
    if nodes == 1 {
        p.data.join("nats").join("nats-server.conf")
    } else {
        p.data
            .join("nats")
            .join(format!("n{}", i + 1))
            .join("nats-server.conf")
    }
}

fn footprint(name: &str, pid: i32) -> Option<Proc> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some(Proc {
        name: name.to_string(),
        rss_kib,
        fds,
    })
}

async fn sample(p: &Pipeline, spec: &RunSpec, at_secs: f64, dropped: usize) -> Sample {
    let mut procs = Vec::new();
    for stage in stages() {
        if let Some(f) = pid_of(&stage_config(p, stage)).and_then(|pid| footprint(stage, pid)) {
            procs.push(f);
        }
    }
    for i in 0..spec.nodes {
        let name = format!("nats-n{}", i + 1);
        if let Some(f) =
            pid_of(&node_config(p, spec.nodes, i)).and_then(|pid| footprint(&name, pid))
        {
            procs.push(f);
        }
    }
    let mut lags = Vec::new();
    for c in pcb_common::topology::default_consumers() {
        let Ok(s) = p.js.get_stream(&c.stream).await else {
            continue;
        };
        if let Ok(info) = s.consumer_info(&c.durable).await {
            lags.push(Lag {
                durable: c.durable.clone(),
                pending: info.num_pending,
                ack_pending: info.num_ack_pending as u64,
                redelivered: info.num_redelivered as u64,
            });
        }
    }
    Sample {
        at_secs,
        dropped,
        procs,
        lags,
    }
}

/// The boards of a synthetic set: (image, template, labels) paths under `dir`.
fn boards_under(dir: &Path) -> Vec<(PathBuf, Option<PathBuf>, Option<PathBuf>)> {
    let mut out = Vec::new();
    for image in crate::board_sources(dir, dir) {
        let image = dir.join(image);
        let unit = pcb_datasets::pairing::pair(&image, dir).expect("pairs");
        let labels = match unit.labels {
            pcb_datasets::pairing::LabelSource::DeepPcb(f) => Some(f),
            _ => None,
        };
        out.push((image, unit.template, labels));
    }
    out
}

/// Copies one board in as an uploader would: labels and template first, the image last,
/// each under a hidden temporary name, then renamed.
fn drop_board(src: &Path, inbox: &Path, board: &(PathBuf, Option<PathBuf>, Option<PathBuf>)) {
    let (image, template, labels) = board;
    for f in labels.iter().chain(template.iter()).chain([image]) {
        let to = inbox.join(f.strip_prefix(src).expect("under src"));
        let dir = to.parent().expect("parent");
        std::fs::create_dir_all(dir).expect("mkdir");
        let tmp = dir.join(format!(
            ".{}.part",
            to.file_name().and_then(|n| n.to_str()).unwrap_or("f")
        ));
        std::fs::copy(f, &tmp).expect("copy");
        std::fs::rename(&tmp, &to).expect("rename");
    }
}

/// Runs `spec` against the pipeline `p` (started by the caller).
pub async fn run(p: &Pipeline, spec: &RunSpec) -> RunReport {
    let count = ((spec.secs as f64) * spec.rate).ceil() as usize;
    let src = p.dir.path().join("soak-boards");
    crate::synth_sized(&src, count, spec.seed, 128, 0.25);
    let boards = boards_under(&src);
    assert_eq!(boards.len(), count, "synthetic boards");
    let sources: Vec<String> = boards
        .iter()
        .map(|(i, _, _)| {
            i.strip_prefix(&src)
                .expect("rel")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let inbox = p.inbox();
    let mut rng = Rng(spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let started = Instant::now();
    let mut dropped = 0usize;
    let mut faults = Vec::new();
    let mut stopped: Vec<(Instant, i32, String)> = Vec::new();
    let mut next_fault = spec.fault_every.map(|d| started + d);
    let mut next_sample = started;
    let mut samples = Vec::new();
    let end = started + Duration::from_secs(spec.secs);
    while Instant::now() < end {
        let t = started.elapsed().as_secs_f64();
        // Boards due by now, at the steady rate.
        let due = ((t * spec.rate) as usize + 1).min(count);
        while dropped < due {
            drop_board(&src, &inbox, &boards[dropped]);
            dropped += 1;
        }
        let now = Instant::now();
        stopped.retain(|(until, pid, name)| {
            if now >= *until {
                // SAFETY: kill(2) on a stage pid read from /proc when it was stopped.
                unsafe { libc::kill(*pid, libc::SIGCONT) };
                faults.push(format!("t={t:.1}s resume {name}"));
                false
            } else {
                true
            }
        });
        if next_fault.is_some_and(|f| now >= f) {
            next_fault = spec.fault_every.map(|d| now + d);
            let kinds = if spec.nodes > 1 { 3 } else { 2 };
            let (what, pid, stop) = match rng.below(kinds) {
                0 => {
                    let all = stages();
                    let stage = all[rng.below(all.len())];
                    (
                        format!("kill {stage}"),
                        pid_of(&stage_config(p, stage)),
                        false,
                    )
                }
                1 => {
                    let all = consumers();
                    let stage = all[rng.below(all.len())];
                    (
                        format!("stop {stage} for {}s", spec.stop_for.as_secs()),
                        pid_of(&stage_config(p, stage)),
                        true,
                    )
                }
                _ => {
                    let i = rng.below(spec.nodes);
                    (
                        format!("kill nats-n{}", i + 1),
                        pid_of(&node_config(p, spec.nodes, i)),
                        false,
                    )
                }
            };
            match pid {
                Some(pid) => {
                    let sig = if stop { libc::SIGSTOP } else { libc::SIGKILL };
                    // SAFETY: kill(2) on a pid read from /proc just now.
                    unsafe { libc::kill(pid, sig) };
                    if stop {
                        let name = what.split_whitespace().nth(1).unwrap_or("?").to_string();
                        stopped.push((now + spec.stop_for, pid, name));
                    }
                    faults.push(format!("t={t:.1}s {what}"));
                }
                None => faults.push(format!("t={t:.1}s {what}: not running (restarting)")),
            }
        }
        if now >= next_sample {
            next_sample = now + spec.sample_every;
            samples.push(sample(p, spec, t, dropped).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while dropped < count {
        drop_board(&src, &inbox, &boards[dropped]);
        dropped += 1;
    }
    for (_, pid, _) in &stopped {
        // SAFETY: as above.
        unsafe { libc::kill(*pid, libc::SIGCONT) };
    }
    let last_drop = Instant::now();
    let boards: BTreeSet<String> = sources.into_iter().collect();
    let (settled, ledger) = p.settle(&boards).await;
    let drain_secs = last_drop.elapsed().as_secs_f64();
    samples.push(sample(p, spec, started.elapsed().as_secs_f64(), dropped).await);
    RunReport {
        boards,
        settled,
        ledger,
        faults,
        samples,
        drain_secs,
    }
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.ledger)?;
        writeln!(
            f,
            "settled: {} ({:.1} s after the last board)",
            self.settled, self.drain_secs
        )?;
        for fault in &self.faults {
            writeln!(f, "fault {fault}")?;
        }
        let names: Vec<String> = self
            .samples
            .iter()
            .flat_map(|s| s.procs.iter().map(|p| p.name.clone()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // Memory in MiB and open files per process, then each durable's backlog.
        write!(f, "{:>7} {:>6}", "t (s)", "boards")?;
        for n in &names {
            write!(f, " {:>16}", format!("{n} MiB/fd"))?;
        }
        writeln!(f, "  lag (pending+unacked, redelivered)")?;
        for s in &self.samples {
            write!(f, "{:>7.0} {:>6}", s.at_secs, s.dropped)?;
            for n in &names {
                match s.procs.iter().find(|p| &p.name == n) {
                    Some(p) => write!(
                        f,
                        " {:>16}",
                        format!("{:.0}/{}", p.rss_kib as f64 / 1024.0, p.fds)
                    )?,
                    None => write!(f, " {:>16}", "-")?,
                }
            }
            let lags: Vec<String> = s
                .lags
                .iter()
                .map(|l| {
                    format!(
                        "{} {}+{},{}",
                        l.durable, l.pending, l.ack_pending, l.redelivered
                    )
                })
                .collect();
            writeln!(f, "  {}", lags.join("; "))?;
        }
        Ok(())
    }
}
