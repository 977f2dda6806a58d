//! The README's `nats` CLI commands, run as written (with `NATS_URL` and `NATS_NKEY` set, as
//! the README's `export` line says, from a folder holding `.pcb-data/identities`) by the
//! CLI that deploy/setup.sh installs, against a live pipeline on a server with
//! authentication on, as `pcb up` runs it: boards through the ingester, encoder and router,
//! a registry with a live model and a detector process. Each must exit 0 and print what the
//! README's comment beside it says. The commands are read from README.md, so a README change
//! without a matching row here fails. The README's Python reader runs too.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pcb_registry::Registry;
use pcb_schemas::{STREAM_DETECTIONS, STREAM_IMAGES, STREAM_REJECTED, STREAM_SHARDS};
use pcb_tests::{wait_until, Env};

/// The model name the README's commands use.
const MODEL: &str = "pcb-defects";

/// How a README command is run.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// To its end.
    Once,
    /// To its end on a terminal (`stream view` pages only on one), answering "no" to
    /// "Next Page?".
    Terminal,
    /// Follows: runs until it printed what it should after [`follow`]'s trigger.
    Follow,
}

/// One README command, how it runs, and what its output must contain.
struct Row {
    command: &'static str,
    mode: Mode,
    expect: &'static [&'static str],
}

/// Every `nats` command of README.md, in its order.
#[rustfmt::skip]
const ROWS: &[Row] = &[
    Row { command: "nats stream info PCB_SHARDS", mode: Mode::Once,
          expect: &["Information for Stream PCB_SHARDS", "Subjects: pcb.shards.*", "Messages:", "Maximum Age:"] },
    Row { command: "nats stream view PCB_SHARDS --subject pcb.shards.3", mode: Mode::Terminal,
          expect: &["Subject: pcb.shards.3", "Pcb-Schema: pcb.shards/v1"] },
    Row { command: "nats stream get PCB_SHARDS 1", mode: Mode::Once,
          expect: &["Item: PCB_SHARDS#1", "pcb.shards.", "Pcb-Schema: pcb.shards/v1"] },
    Row { command: "nats consumer add PCB_SHARDS replay3 --pull --filter pcb.shards.3 --deliver all --ack explicit --defaults",
          mode: Mode::Once,
          expect: &["Information for Consumer PCB_SHARDS > replay3", "Filter Subject: pcb.shards.3", "Deliver Policy: All", "Ack Policy: Explicit"] },
    Row { command: "nats consumer next PCB_SHARDS replay3 --count 10", mode: Mode::Once,
          expect: &["subj: pcb.shards.3", "Acknowledged message"] },
    Row { command: "nats stream view PCB_REJECTED", mode: Mode::Terminal,
          expect: &["Subject: pcb.rejected.ingester", "Pcb-Schema: pcb.rejected/v1", "not-an-image"] },
    Row { command: "nats sub pcb.detections --nkey .pcb-data/identities/reader.nk --inbox-prefix _INBOX_reader", mode: Mode::Follow,
          expect: &["Received on \"pcb.detections\"", "Pcb-Schema: pcb.detections/v1"] },
    Row { command: "nats stream view PCB_DETECTIONS", mode: Mode::Terminal,
          expect: &["Subject: pcb.detections", "Pcb-Schema: pcb.detections/v1"] },
    Row { command: "nats kv ls pcb_models", mode: Mode::Once,
          expect: &["model.pcb-defects.live", "model.pcb-defects.latest", "model.pcb-defects.v.1"] },
    Row { command: "nats kv get pcb_models model.pcb-defects.live --raw", mode: Mode::Once,
          expect: &["\"version\": 1", "\"history\": []"] },
    Row { command: "nats kv watch pcb_models", mode: Mode::Follow,
          expect: &["PUT pcb_models > model.pcb-defects.live: {\n  \"version\": 2,"] },
    Row { command: "nats object ls pcb_model_artifacts", mode: Mode::Once,
          expect: &["pcb-defects/v1.safetensors"] },
    Row { command: "nats sub pcb.models.events", mode: Mode::Follow,
          expect: &["Received on \"pcb.models.events\"", "Pcb-Schema: pcb.models.events/v1", "loaded"] },
];

/// The `nats …` lines of README.md's code blocks, without their comments.
fn readme_commands() -> Vec<String> {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).expect("README.md");
    text.lines()
        .filter(|l| l.starts_with("nats "))
        .map(|l| {
            let cmd = l.split(" # ").next().unwrap_or(l);
            cmd.split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .collect()
}

/// The README's Python example (the code block after "Payloads are MessagePack").
fn readme_python() -> String {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).expect("README.md");
    let after = text
        .split_once("Payloads are MessagePack")
        .expect("the Python example's paragraph")
        .1;
    let block = after.split_once("```python\n").expect("a python block").1;
    block.split_once("```").expect("closed").0.to_string()
}

/// The README's `export` line: the variables it sets, with `$PWD` as `root`.
fn readme_exports(root: &Path) -> Vec<(String, String)> {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).expect("README.md");
    let line = text
        .lines()
        .find(|l| l.starts_with("export ") && l.contains("NATS_URL"))
        .expect("the export line");
    line.split_whitespace()
        .skip(1)
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.replace("$PWD", &root.display().to_string()),
            )
        })
        .collect()
}

/// `nats` with `command`'s arguments against `url`, as the admin (the README's
/// `NATS_NKEY`), from `root`, with a config dir of its own (no saved context applies).
fn nats(command: &str, url: &str, home: &Path, root: &Path) -> Command {
    let mut words = command.split_whitespace();
    assert_eq!(words.next(), Some("nats"));
    let mut cmd = Command::new(pcb_tests::nats_cli());
    for (key, value) in readme_exports(root) {
        if key == "NATS_NKEY" {
            cmd.env(key, value);
        }
    }
    cmd.args(words)
        .current_dir(root)
        .env("NATS_URL", url)
        .env("XDG_CONFIG_HOME", home)
        .env("HOME", home)
        .env_remove("NATS_CONTEXT");
    cmd
}

/// Runs `cmd` to its end (at most 60 s); returns whether it exited with 0, and its output.
fn run_once(cmd: Command) -> (bool, String) {
    let Following {
        child,
        out,
        readers,
    } = follow(cmd);
    let ok = wait_or_kill(child, Duration::from_secs(60));
    // The readers end with the pipes, once they took the last bytes.
    for r in readers {
        let _ = r.join();
    }
    let text = out.lock().expect("lock").clone();
    (ok, text)
}

/// Runs `cmd` on a pseudo-terminal of 160x50 to its end (at most 60 s), answering "n" to
/// each "Next Page?"; returns its exit status and everything it wrote.
fn run_on_terminal(mut cmd: Command) -> (bool, String) {
    let (mut master, slave) = open_pty();
    let child = {
        cmd.stdin(slave.try_clone().expect("pty"))
            .stdout(slave.try_clone().expect("pty"))
            .stderr(slave);
        cmd.spawn().expect("run the nats CLI")
    };
    // The parent's copies of the terminal's slave side are gone with `cmd`: reading the
    // master ends (EIO) once the child has exited.
    drop(cmd);
    let mut writer = master.try_clone().expect("pty");
    let out = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let out = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Cursor-position queries answered, prompts answered.
            let (mut positions, mut answered) = (0, 0);
            loop {
                let mut fds = libc::pollfd {
                    fd: master.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd that lives through the call.
                let ready = unsafe { libc::poll(&mut fds, 1, 300) };
                if ready > 0 {
                    match master.read(&mut buf) {
                        Ok(n) if n > 0 => out.lock().expect("lock").extend_from_slice(&buf[..n]),
                        // EIO: the program has exited.
                        _ => break,
                    }
                }
                let text = String::from_utf8_lossy(&out.lock().expect("lock")).into_owned();
                // The prompt asks where the cursor is (ESC[6n), twice: for the terminal's
                // size, then for the cursor; each waits for its answer.
                while positions < text.matches("\x1b[6n").count() {
                    positions += 1;
                    let _ = writer.write_all(b"\x1b[50;1R");
                }
                // Answered once the prompt has had its answers and gone quiet (an answer
                // typed at once after them is lost).
                let prompts: Vec<usize> =
                    text.match_indices("Next Page?").map(|(i, _)| i).collect();
                if ready == 0 && prompts.len() > answered {
                    let after = &text[prompts[prompts.len() - 1]..];
                    if after.matches("\x1b[6n").count() >= 2 {
                        answered = prompts.len();
                        let _ = writer.write_all(b"n\r");
                    }
                }
            }
        })
    };
    let status = wait_or_kill(child, Duration::from_secs(60));
    let _ = reader.join();
    let text = String::from_utf8_lossy(&out.lock().expect("lock")).into_owned();
    (status, text)
}

/// A pseudo-terminal (master, slave) of 160 columns and 50 rows.
fn open_pty() -> (std::fs::File, std::fs::File) {
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: 50,
        ws_col: 160,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two new descriptors into `master` and `slave`; the name and
    // termios pointers may be null; `size` outlives the call.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned by nothing else.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    }
}

/// Waits for `child` up to `limit`, then kills it; returns whether it exited with 0.
fn wait_or_kill(mut child: Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// A following command (`sub`, `kv watch`) running with its output collected.
struct Following {
    child: Child,
    out: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// Starts `cmd` with its stdout and stderr collected.
fn follow(mut cmd: Command) -> Following {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the nats CLI");
    let out = Arc::new(Mutex::new(String::new()));
    let pipes: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("stdout")),
        Box::new(child.stderr.take().expect("stderr")),
    ];
    let mut readers = Vec::new();
    for mut pipe in pipes {
        let out = out.clone();
        readers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock()
                    .expect("lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }));
    }
    Following {
        child,
        out,
        readers,
    }
}

impl Following {
    fn text(&self) -> String {
        self.out.lock().expect("lock").clone()
    }

    /// Waits up to `secs` until its output holds every one of `needles`.
    async fn shows(&self, needles: &[&str], secs: u64) -> bool {
        wait_until(Duration::from_secs(secs), || async {
            let t = self.text();
            needles.iter().all(|n| t.contains(n))
        })
        .await
    }

    /// Stops it (it runs until interrupted) and returns whether it was still running.
    fn stop(mut self) -> bool {
        let running = matches!(self.child.try_wait(), Ok(None));
        let _ = self.child.kill();
        let _ = self.child.wait();
        running
    }
}

/// The detector's log, for failure messages.
fn log_of(path: &PathBuf) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readmes_nats_commands_print_what_the_readme_says() {
    let in_readme = readme_commands();
    let in_test: Vec<&str> = ROWS.iter().map(|r| r.command).collect();
    assert_eq!(
        in_readme, in_test,
        "README.md's nats commands and this test's rows differ: keep them in step"
    );
    let nats_bin = pcb_tests::nats_cli();
    let version = run_once({
        let mut c = Command::new(&nats_bin);
        c.arg("--version");
        c
    });
    assert!(version.0, "{} --version: {}", nats_bin.display(), version.1);

    // A live pipeline: a live model, a detector process, the encoder and router in-process,
    // on a server that admits only the identities in <root>/.pcb-data/identities.
    let env = Env::start_secured().await;
    let url = env.server.url();
    let root = env.dir.path().to_path_buf();
    let exports = readme_exports(&root);
    let admin = root
        .join(".pcb-data/identities/admin.nk")
        .display()
        .to_string();
    assert!(
        exports.contains(&("NATS_NKEY".to_string(), admin)),
        "the README's export line sets no NATS_NKEY to the admin seed: {exports:?}"
    );
    let home = env.dir.path().join("cli-home");
    std::fs::create_dir_all(&home).expect("home");
    let registry = Registry::open(&env.js).await.expect("registry");
    let v1 = pcb_tests::register_random_model(&registry, MODEL, env.dir.path(), 1).await;
    registry.promote(MODEL, v1, "test").await.expect("promote");
    let (mut detector, log) = pcb_tests::spawn_detector(&env, "det", MODEL);
    let (stop, handles) = env.start_encoder_router();

    // Boards until shard 3 holds the 10 records `consumer next --count 10` takes, and a
    // file that is not an image, for a dead letter.
    let mut boards = 0u64;
    for batch in 0..12u64 {
        let dir = env.dir.path().join(format!("boards-{batch}"));
        pcb_tests::synth_sized(&dir, 16, 100 + batch, 64, 0.2);
        if batch == 0 {
            std::fs::write(dir.join("not-a-board.jpg"), b"a note, not a photo\n").expect("write");
        }
        env.import(&dir).await;
        boards += 16;
        let routed = env
            .wait_count(
                STREAM_SHARDS,
                "pcb.shards.",
                boards,
                Duration::from_secs(120),
            )
            .await;
        assert!(
            routed,
            "{boards} boards not routed: {:?}",
            env.subject_counts(STREAM_IMAGES).await
        );
        if env.count(STREAM_SHARDS, "pcb.shards.3").await >= 10 {
            break;
        }
    }
    assert!(env.count(STREAM_SHARDS, "pcb.shards.3").await >= 10);
    assert!(env.count(STREAM_REJECTED, "pcb.rejected.ingester").await >= 1);
    let detected = env
        .wait_count(
            STREAM_DETECTIONS,
            "pcb.detections",
            boards,
            Duration::from_secs(300),
        )
        .await;
    assert!(
        detected,
        "not {boards} detections; detector log:\n{}",
        log_of(&log)
    );

    let mut printed = Vec::new();
    // The bounded commands first, then the following ones with what they wait for.
    for row in ROWS.iter().filter(|r| r.mode != Mode::Follow) {
        let cmd = nats(row.command, &url, &home, &root);
        let (ok, text) = match row.mode {
            Mode::Terminal => tokio::task::spawn_blocking(move || run_on_terminal(cmd)).await,
            _ => tokio::task::spawn_blocking(move || run_once(cmd)).await,
        }
        .expect("join");
        assert!(ok, "`{}` failed:\n{text}", row.command);
        for needle in row.expect {
            assert!(
                text.contains(needle),
                "`{}` printed no {needle:?}:\n{text}",
                row.command
            );
        }
        if row.command.starts_with("nats consumer next") {
            assert_eq!(
                text.matches("Acknowledged message").count(),
                10,
                "`{}` acked other than 10 records:\n{text}",
                row.command
            );
        }
        if row.command.starts_with("nats stream view PCB_SHARDS") {
            assert!(
                !text.contains("Subject: pcb.shards.0"),
                "`{}` showed another shard:\n{text}",
                row.command
            );
        }
        printed.push((row.command, text));
    }

    // Following: new detections, and a promotion (the KV write, the detector's `loaded`).
    let followers: Vec<(&Row, Following)> = ROWS
        .iter()
        .filter(|r| r.mode == Mode::Follow)
        .map(|r| (r, follow(nats(r.command, &url, &home, &root))))
        .collect();
    // Each says it is subscribed/watching before anything is published.
    for (row, f) in &followers {
        let ready = wait_until(Duration::from_secs(20), || async {
            let t = f.text();
            t.contains("Subscribing on") || t.contains("pcb_models >")
        })
        .await;
        assert!(ready, "`{}` did not start:\n{}", row.command, f.text());
    }
    let dir = env.dir.path().join("boards-live");
    pcb_tests::synth_sized(&dir, 2, 999, 64, 0.2);
    env.import(&dir).await;
    let v2 = pcb_tests::register_random_model(&registry, MODEL, env.dir.path(), 2).await;
    registry.promote(MODEL, v2, "test").await.expect("promote");
    for (row, f) in followers {
        let seen = f.shows(row.expect, 120).await;
        let text = f.text();
        assert!(
            seen,
            "`{}` printed not all of {:?}; detector log:\n{}\noutput:\n{text}",
            row.command,
            row.expect,
            log_of(&log)
        );
        assert!(f.stop(), "`{}` ended by itself:\n{text}", row.command);
        printed.push((row.command, text));
    }

    // The README's Python reader, from the same folder: every record of shard 3.
    let run = root.join(".pcb-data").join("run");
    std::fs::create_dir_all(&run).expect("run dir");
    std::fs::write(run.join("nats.url"), &url).expect("url file");
    let script = root.join("readme_reader.py");
    std::fs::write(&script, readme_python()).expect("script");
    let printed_py =
        pcb_tests::run_python_in(&pcb_tests::venv_python(), &root, "readme_reader.py", &[]);
    let records = printed_py
        .lines()
        .filter(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() == 4 && matches!(w[0], "train" | "val") && w[1].len() == 12 && w[3] == "defects"
        })
        .count() as u64;
    assert_eq!(
        records,
        env.count(STREAM_SHARDS, "pcb.shards.3").await,
        "{printed_py}"
    );

    for (command, text) in &printed {
        let head: Vec<&str> = text.lines().take(6).collect();
        println!("$ {command}\n{}\n", head.join("\n"));
    }
    stop.trigger();
    for h in handles {
        let _ = h.await;
    }
    let _ = detector.kill();
    let _ = detector.wait();
}
