//! `pcb up` and `pcb demo` own their processes: a SIGKILL of `pcb up` leaves no stage and
//! no private nats-server running (each child is tied to it with `PR_SET_PDEATHSIG`), and a
//! SIGTERM stops `pcb demo` cleanly whatever phase it is in.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pcb_tests::bin;

/// Every live descendant of `pid` (from /proc), zombies left out.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        if state != "Z" {
            if let Ok(pp) = ppid.parse::<u32>() {
                parent_of.push((p, pp));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(q) = frontier.pop() {
        for &(p, pp) in &parent_of {
            if pp == q && !out.contains(&p) {
                out.push(p);
                frontier.push(p);
            }
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

fn name_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `pcb` with its stdout lines arriving on a channel.
fn start_pcb(args: &[&str], data: &Path) -> (Child, mpsc::Receiver<String>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut child = Command::new(bin("pcb"))
        .current_dir(&root)
        .args(args)
        .args(["--viewer-addr", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pcb");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for a line containing `marker`; returns what was printed so far.
fn wait_for(rx: &mpsc::Receiver<String>, marker: &str, seen: &mut String) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(marker) {
                    return;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    panic!("{marker:?} never printed; output:\n{seen}");
}

fn wait_gone(pids: &[u32], within: Duration) -> Vec<(u32, String)> {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<(u32, String)> = pids
            .iter()
            .filter(|p| alive(**p))
            .map(|p| (*p, name_of(*p)))
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({sig}) failed");
}

#[test]
fn a_sigkilled_pcb_up_leaves_no_stage_and_no_server_running() {
    let data = tempfile::tempdir().expect("tempdir");
    let (mut pcb, rx) = start_pcb(&["up"], data.path());
    let mut seen = String::new();
    wait_for(&rx, "stops every stage cleanly", &mut seen);
    let children = descendants(pcb.id());
    let names: Vec<String> = children.iter().map(|p| name_of(*p)).collect();
    for want in [
        "nats-server",
        "ingester",
        "encoder",
        "router",
        "registry",
        "detector",
        "viewer",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not running under pcb up: {names:?}"
        );
    }
    signal(&pcb, libc::SIGKILL);
    let _ = pcb.wait();
    let left = wait_gone(&children, Duration::from_secs(30));
    assert!(
        left.is_empty(),
        "still running after SIGKILL of pcb up: {left:?}"
    );
}

/// Starts a demo, sends SIGTERM when `marker` is printed, and checks that it ends within
/// a minute with every process it started gone.
fn sigterm_demo_at(marker: &str, extra: &[&str]) {
    let data = tempfile::tempdir().expect("tempdir");
    let mut args = vec!["demo", "--count", "20", "--timeout-secs", "900"];
    args.extend_from_slice(extra);
    let (mut pcb, rx) = start_pcb(&args, data.path());
    let mut seen = String::new();
    wait_for(&rx, marker, &mut seen);
    let children = descendants(pcb.id());
    assert!(
        !children.is_empty(),
        "no processes under pcb demo at {marker:?}"
    );
    signal(&pcb, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = pcb.try_wait().expect("wait") {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let left = wait_gone(&children, Duration::from_secs(5));
    if status.is_none() {
        let _ = pcb.kill();
    }
    assert!(
        status.is_some(),
        "pcb demo still running 60 s after SIGTERM at {marker:?}"
    );
    assert!(
        left.is_empty(),
        "left running after SIGTERM at {marker:?}: {left:?}"
    );
}

#[test]
fn sigterm_stops_the_demo_while_it_starts_files_and_detects() {
    // Just up: the sample is being generated or dropped.
    sigterm_demo_at("pipeline up", &[]);
    // The boards are flowing through ingester, encoder and router.
    sigterm_demo_at("dropped", &[]);
    // The detector is answering (the case that used to leave everything running).
    sigterm_demo_at(
        "waiting for the registry to promote it",
        &["--keep-running"],
    );
    // After the summary, kept running.
    sigterm_demo_at("pipeline still running", &["--keep-running"]);
}
