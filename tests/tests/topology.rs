//! The topology declared once: stages find what they need or name what is missing, `pcb
//! init` creates everything and is idempotent, a stage never resizes a stream, every command
//! reaches a server that wants the pipeline file's user and password, and the README's
//! tables are the ones derived from the declaration.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use pcb::server::NatsServer;
use pcb_schemas::topology::{stages_markdown, subjects_markdown};
use pcb_tests::bin;

fn bare_server(dir: &Path, extra: &str) -> NatsServer {
    NatsServer::start_with(&dir.join("nats"), 0, extra)
        .unwrap_or_else(|e| panic!("nats-server does not start: {e}"))
}

fn pcb(args: &[&str]) -> Output {
    Command::new(bin("pcb"))
        .args(args)
        .env_remove("PCB_PIPELINE")
        .output()
        .expect("run pcb")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn write_pipeline(dir: &Path, nats: &str, images_max_bytes: i64) -> std::path::PathBuf {
    let p = dir.join("pipeline.toml");
    std::fs::write(
        &p,
        format!(
            "[pipeline]\ndata_dir = {:?}\n[nats]\n{nats}\n[streams.images]\nmax_bytes = {images_max_bytes}\n",
            dir.join("data").display().to_string()
        ),
    )
    .expect("write pipeline");
    p
}

/// Streams that reserve more than a disk has: `pcb init` on a server of one's own names
/// the stream, the total and the key to lower (not the server's bare "insufficient storage
/// resources"); `pcb up`'s private server is allowed what they reserve and warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_larger_than_the_disk_are_named_with_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = bare_server(dir.path(), "");
    let url = server.url();
    // 1 PiB of images: more than any test machine's disk.
    let pipeline = write_pipeline(dir.path(), "url = \"\"", 1 << 50);
    let p = pipeline.to_str().expect("utf-8");
    let refused = pcb(&["init", "--nats-url", &url, "--pipeline", p]);
    assert!(!refused.status.success(), "{}", text(&refused));
    let said = text(&refused);
    for needle in [
        "no room for stream PCB_IMAGES",
        // 1 PiB + the other five streams' 8 + 2 + 1 + 1 + 1 GiB + the image files' 8 GiB.
        "add up to 1048597.0 GiB",
        "max_bytes in the pipeline file",
    ] {
        assert!(said.contains(needle), "missing {needle:?} in:\n{said}");
    }

    let mut up = Command::new(bin("pcb"))
        .args(["up", "--pipeline", p, "--viewer-addr", "127.0.0.1:0"])
        .env_remove("PCB_PIPELINE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn pcb up");
    let err = up.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !seen.contains("private nats-server at") && std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
            seen.push_str(&line);
            seen.push('\n');
        }
    }
    // The streams exist with their limit: the pipeline runs.
    let created = pcb_tests::wait_until(Duration::from_secs(60), || async {
        let status = pcb(&["status", "--pipeline", p]);
        status.status.success() && text(&status).contains("PCB_IMAGES")
    })
    .await;
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    let stopped = up.wait().expect("wait");
    assert!(
        seen.contains("pcb: warning: the streams may hold up to 1048597.0 GiB"),
        "{seen}"
    );
    assert!(created, "the streams were not created:\n{seen}");
    assert!(stopped.success(), "pcb up: {stopped}\n{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_whose_stream_is_missing_says_which_and_how_to_create_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = bare_server(dir.path(), "");
    let client = async_nats::connect(server.url()).await.expect("connect");
    let file: pcb_encoder::FileConfig = toml::from_str(&format!(
        "[nats]\nurl = {:?}\n[metrics]\naddr = \"\"\n",
        server.url()
    ))
    .expect("config");
    let shutdown = pcb_common::Shutdown::new();
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        pcb_common::stage::run(file, client, shutdown),
    )
    .await
    .expect("the stage stops at once")
    .expect_err("the stage refuses to start")
    .to_string();
    assert!(
        err.contains("stream PCB_IMAGES does not exist") && err.contains("pcb init"),
        "{err}"
    );
    // It created nothing on its way out.
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.expect("c"));
    assert!(js.get_stream("PCB_IMAGES").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_twice_changes_nothing_and_a_stage_never_resizes_a_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = bare_server(dir.path(), "");
    let url = server.url();
    let pipeline = write_pipeline(dir.path(), "url = \"\"", 1 << 30);
    let p = pipeline.to_str().expect("utf-8");
    let first = pcb(&["init", "--nats-url", &url, "--pipeline", p]);
    assert!(first.status.success(), "{}", text(&first));
    let first = text(&first);
    for line in [
        "stream    PCB_IMAGES",
        "bucket    pcb_models",
        "consumer  encoder",
        "consumer  detector",
    ] {
        assert!(first.contains(line), "{line:?} missing:\n{first}");
    }
    assert!(first.contains("created"), "{first}");
    let second = pcb(&["init", "--nats-url", &url, "--pipeline", p]);
    assert!(second.status.success(), "{}", text(&second));
    let second = text(&second);
    let rows: Vec<&str> = second.lines().filter(|l| !l.starts_with("NATS")).collect();
    assert!(rows.len() >= 5 + 2 + 4, "{second}");
    assert!(
        rows.iter().all(|l| l.ends_with("unchanged")),
        "the second init changed something:\n{second}"
    );

    // A stage config cannot even carry stream limits any more...
    let stage_file = dir.path().join("encoder.toml");
    std::fs::write(
        &stage_file,
        format!("[nats]\nurl = {url:?}\n[streams.images]\nmax_bytes = 1024\n"),
    )
    .expect("write");
    let refused = Command::new(bin("encoder"))
        .arg("--config")
        .arg(&stage_file)
        .output()
        .expect("run encoder");
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("unknown section `streams`"),
        "{}",
        text(&refused)
    );
    // ...and one that starts leaves the stream as `pcb init` made it.
    std::fs::write(
        &stage_file,
        format!("[nats]\nurl = {url:?}\n[metrics]\naddr = \"\"\n"),
    )
    .expect("write");
    let mut encoder = Command::new(bin("encoder"))
        .arg("--config")
        .arg(&stage_file)
        .spawn()
        .expect("spawn encoder");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connect"));
    let consuming = pcb_tests::wait_until(Duration::from_secs(30), || async {
        let s = js.get_stream("PCB_IMAGES").await.expect("stream");
        s.consumer_info("encoder")
            .await
            .map(|c| c.num_waiting > 0)
            .unwrap_or(false)
    })
    .await;
    let _ = encoder.kill();
    let _ = encoder.wait();
    assert!(consuming, "the encoder did not start consuming");
    let mut s = js.get_stream("PCB_IMAGES").await.expect("stream");
    assert_eq!(s.info().await.expect("info").config.max_bytes, 1 << 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_models_and_train_use_the_pipeline_files_user_and_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = bare_server(
        dir.path(),
        "authorization {\n  user: pcbadmin\n  password: s3cret-pw\n}\n",
    );
    let url = server.url();
    let good = write_pipeline(
        dir.path(),
        &format!("url = {url:?}\nuser = \"pcbadmin\"\npassword = \"s3cret-pw\""),
        1 << 30,
    );
    let p = good.to_str().expect("utf-8");
    let init = pcb(&["init", "--pipeline", p]);
    assert!(init.status.success(), "{}", text(&init));
    let status = pcb(&["status", "--pipeline", p]);
    assert!(status.status.success(), "{}", text(&status));
    assert!(text(&status).contains("PCB_IMAGES"), "{}", text(&status));
    let models = pcb(&["models", "list", "--pipeline", p]);
    assert!(models.status.success(), "{}", text(&models));
    // No shards yet: the job connects, reads the empty snapshot and says so.
    let train = pcb(&["train", "--pipeline", p, "--epochs", "1", "--ranks", "1"]);
    let out = text(&train);
    assert!(
        !out.contains("uthorization") && !out.contains("connecting to"),
        "pcb train did not get through:\n{out}"
    );
    assert!(out.to_lowercase().contains("shard"), "{out}");

    // The same commands with a wrong password are refused by the server, not by us.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let bad = write_pipeline(
        dir2.path(),
        &format!("url = {url:?}\nuser = \"pcbadmin\"\npassword = \"wrong\""),
        1 << 30,
    );
    let refused = pcb(&["status", "--pipeline", bad.to_str().expect("utf-8")]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).to_lowercase().contains("authoriz"),
        "{}",
        text(&refused)
    );
}

fn block<'a>(readme: &'a str, name: &str) -> &'a str {
    let open = format!("<!-- topology:{name} -->\n");
    let close = format!("<!-- /topology:{name} -->");
    let start = readme
        .find(&open)
        .unwrap_or_else(|| panic!("README has no {open:?} marker"))
        + open.len();
    let end = readme[start..]
        .find(&close)
        .unwrap_or_else(|| panic!("README has no {close:?} marker"))
        + start;
    &readme[start..end]
}

#[test]
fn the_readme_tables_are_the_declared_topology() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    assert_eq!(
        block(&readme, "subjects"),
        subjects_markdown(),
        "README's subjects table differs from schemas/src/topology.rs: paste `pcb topology`"
    );
    assert_eq!(
        block(&readme, "stages"),
        stages_markdown(),
        "README's stages table differs from schemas/src/topology.rs: paste `pcb topology`"
    );
    assert_eq!(
        block(&readme, "identities"),
        pcb_common::identity::identities_markdown(),
        "README's identities table differs from the permissions: paste `pcb topology`"
    );
}
