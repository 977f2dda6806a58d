//! Least privilege against the real server: every identity `pcb` issues may publish and
//! subscribe to what the topology table gives it and is refused the rest; a client without
//! credentials, or with a key the server does not know, is refused; and a whole pipeline
//! started by `pcb up` (every stage with its own identity), with `pcb status`, `pcb
//! models`, `pcb train` and the viewer, runs without one permission violation in the
//! server's log.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use pcb::server::NatsServer;
use pcb_common::{Identity, IdentityStore};
use pcb_schemas::StageName;
use pcb_tests::{bin, wait_until};

/// A client of `id` whose server errors (permission violations) are collected.
async fn client_of(
    ids: &IdentityStore,
    id: Identity,
    url: &str,
) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let sink = errors.clone();
    let seed = std::fs::read_to_string(ids.seed_file(id)).expect("seed");
    let client = async_nats::ConnectOptions::new()
        .nkey(seed.trim().to_string())
        .custom_inbox_prefix(id.inbox_prefix())
        .request_timeout(Some(Duration::from_secs(3)))
        .event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    sink.lock().expect("lock").push(e.to_string());
                }
            }
        })
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("{} does not connect: {e}", id.name()));
    (client, errors)
}

/// Whether the server refused `what` (a publish or a subscription to `subject`) by now.
async fn refused(errors: &Arc<Mutex<Vec<String>>>, what: &str, subject: &str) -> bool {
    let needle = format!("permissions violation for {what} to \"{subject}\"").to_lowercase();
    wait_until(Duration::from_secs(3), || {
        let found = errors
            .lock()
            .expect("lock")
            .iter()
            .any(|e| e.to_lowercase().contains(&needle));
        async move { found }
    })
    .await
}

fn no_errors(errors: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    errors.lock().expect("lock").clone()
}

/// One subject a stage publishes, made concrete.
fn output_of(stage: StageName) -> String {
    stage.decl().outputs[0].replace(['*', '>'], "0")
}

/// A pipeline subject `stage` does not declare: another stage's output.
fn foreign_output(stage: StageName) -> String {
    let decl = stage.decl();
    pcb_schemas::topology::SUBJECTS
        .iter()
        .map(|s| s.pattern.replace('*', "x"))
        .find(|s| !decl.publishes(s))
        .expect("some subject is not this stage's")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_identity_publishes_and_reads_what_the_topology_gives_it_and_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = IdentityStore::ensure(&dir.path().join("identities")).expect("identities");
    let nats_dir = dir.path().join("nats");
    let for_server = ids.clone();
    let server =
        tokio::task::spawn_blocking(move || NatsServer::start_secured(&nats_dir, 0, &for_server))
            .await
            .expect("join")
            .expect("secured server");
    let url = server.url();

    // Without credentials, or with a key the server does not know: refused.
    let anonymous = async_nats::ConnectOptions::new()
        .connect(url.as_str())
        .await
        .expect_err("no credentials");
    assert!(
        anonymous
            .to_string()
            .to_lowercase()
            .contains("authorization"),
        "{anonymous}"
    );
    let stranger = nkeys::KeyPair::new_user().seed().expect("seed");
    let unknown = async_nats::ConnectOptions::new()
        .nkey(stranger)
        .connect(url.as_str())
        .await
        .expect_err("unknown key");
    assert!(
        unknown.to_string().to_lowercase().contains("authorization"),
        "{unknown}"
    );

    // The admin provisions, as `pcb up` does.
    let (admin, admin_errors) = client_of(&ids, Identity::Admin, &url).await;
    let admin_js = jetstream::new(admin.clone());
    pcb_common::topology::provision_defaults(&admin_js)
        .await
        .expect("provisioned by admin");

    for stage in StageName::ALL {
        let id = Identity::Stage(stage);
        let (client, errors) = client_of(&ids, id, &url).await;
        let js = jetstream::new(client.clone());
        // Allowed publish: its first declared output, stored with an ack.
        let subject = output_of(stage);
        js.publish(subject.clone(), "probe".into())
            .await
            .expect("publish")
            .await
            .unwrap_or_else(|e| panic!("{stage} may publish {subject}: {e}"));
        // Denied publish: a subject of another stage.
        let foreign = foreign_output(stage);
        client
            .publish(foreign.clone(), "forged".into())
            .await
            .expect("sent");
        client.flush().await.expect("flush");
        assert!(
            refused(&errors, "publish", &foreign).await,
            "{stage} published {foreign}: {:?}",
            no_errors(&errors)
        );
        // Allowed read: each declared input, through its durable or a private view.
        for input in stage.decl().inputs {
            // A subject of the pipeline inside the input's filter.
            let probe = pcb_schemas::topology::SUBJECTS
                .iter()
                .find(|s| pcb_schemas::topology::patterns_overlap(s.pattern, input.filter))
                .expect("a subject in the filter")
                .pattern
                .replace('*', "x");
            admin_js
                .publish(probe.clone(), "probe".into())
                .await
                .expect("publish")
                .await
                .expect("stored");
            let stream = js
                .get_stream(input.stream.name())
                .await
                .unwrap_or_else(|e| panic!("{stage} may look up {}: {e}", input.stream.name()));
            let got = match input.mode {
                pcb_schemas::topology::ReadMode::Durable(d) => {
                    let consumer: jetstream::consumer::PullConsumer = stream
                        .get_consumer(d.name)
                        .await
                        .unwrap_or_else(|e| panic!("{stage} may open its durable {}: {e}", d.name));
                    let mut batch = consumer
                        .fetch()
                        .max_messages(1)
                        .expires(Duration::from_secs(2))
                        .messages()
                        .await
                        .expect("fetch");
                    let msg = batch.next().await.expect("a message").expect("ok");
                    msg.ack().await.expect("ack");
                    msg.subject.to_string()
                }
                pcb_schemas::topology::ReadMode::View => {
                    let consumer = stream
                        .create_consumer(jetstream::consumer::pull::OrderedConfig {
                            filter_subject: probe.clone(),
                            ..Default::default()
                        })
                        .await
                        .unwrap_or_else(|e| panic!("{stage} may view {probe}: {e}"));
                    let mut msgs = consumer.messages().await.expect("messages");
                    let msg = tokio::time::timeout(Duration::from_secs(5), msgs.next())
                        .await
                        .expect("in time")
                        .expect("a message")
                        .expect("ok");
                    msg.subject.to_string()
                }
            };
            assert_eq!(got, probe, "{stage} reads {probe}");
        }
        // Denied read: a pipeline subject directly, and another identity's inbox.
        for denied in ["pcb.images.raw", "_INBOX_admin.>"] {
            let _sub = client.subscribe(denied).await.expect("sent");
            client.flush().await.expect("flush");
            assert!(
                refused(&errors, "subscription", denied).await,
                "{stage} subscribed to {denied}: {:?}",
                no_errors(&errors)
            );
        }
        let violations: Vec<String> = no_errors(&errors)
            .into_iter()
            .filter(|e| {
                !e.contains(&foreign)
                    && !e.contains("pcb.images.raw")
                    && !e.contains("_INBOX_admin")
            })
            .collect();
        assert!(violations.is_empty(), "{stage}: {violations:?}");
    }

    // A stage cannot take another's messages: the viewer views PCB_IMAGES but may not
    // pull from the detector's durable.
    let (viewer, viewer_errors) = client_of(&ids, Identity::Stage(StageName::Viewer), &url).await;
    let next = "$JS.API.CONSUMER.MSG.NEXT.PCB_IMAGES.detector";
    viewer
        .publish_with_reply(next, viewer.new_inbox(), "1".into())
        .await
        .expect("sent");
    viewer.flush().await.expect("flush");
    assert!(refused(&viewer_errors, "publish", next).await);

    // The reader: detections, model events and progress; it publishes nothing.
    let (reader, reader_errors) = client_of(&ids, Identity::Reader, &url).await;
    let mut live = reader.subscribe("pcb.detections").await.expect("subscribe");
    // A request on the same connection: once its answer is back, the server has taken the
    // subscription too (flush only writes it out).
    let reader_js = jetstream::new(reader.clone());
    reader_js
        .get_stream(pcb_schemas::STREAM_DETECTIONS)
        .await
        .expect("the reader looks up detections");
    admin
        .publish("pcb.detections", "line-side".into())
        .await
        .expect("publish");
    admin.flush().await.expect("flush");
    let msg = tokio::time::timeout(Duration::from_secs(15), live.next())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no detection for the reader: {:?} {:?}",
                no_errors(&reader_errors),
                no_errors(&admin_errors)
            )
        })
        .expect("a detection");
    assert_eq!(&msg.payload[..], b"line-side");
    let mut detections = reader_js
        .get_stream(pcb_schemas::STREAM_DETECTIONS)
        .await
        .expect("the reader looks up detections");
    assert!(detections.info().await.expect("info").state.messages >= 1);
    for subject in [
        "pcb.detections",
        "pcb.images.raw",
        "$KV.pcb_models.live.pcb-defects",
    ] {
        reader
            .publish(subject, "forged".into())
            .await
            .expect("sent");
        reader.flush().await.expect("flush");
        assert!(
            refused(&reader_errors, "publish", subject).await,
            "the reader published {subject}"
        );
    }
    let _sub = reader.subscribe("pcb.images.encoded").await.expect("sent");
    reader.flush().await.expect("flush");
    assert!(refused(&reader_errors, "subscription", "pcb.images.encoded").await);
    assert!(
        no_errors(&admin_errors).is_empty(),
        "{:?}",
        no_errors(&admin_errors)
    );
    // The server logs each refusal: what the pipeline test below counts on.
    let log = std::fs::read_to_string(server.dir().join("nats-server.log")).expect("log");
    assert!(
        log.lines().filter(|l| l.contains("Violation")).count() >= 2 * StageName::ALL.len(),
        "{log}"
    );
}

fn pcb(args: &[&str]) -> std::process::Output {
    Command::new(bin("pcb"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run pcb")
}

/// Runs `pcb` with `args`, asserts it succeeded and printed `needle`; returns its output.
fn pcb_prints(args: &[&str], needle: &str) -> String {
    let out = pcb(args);
    let printed = text(&out);
    assert!(
        out.status.success() && printed.contains(needle),
        "pcb {args:?} failed or printed no {needle:?}:\n{printed}"
    );
    printed
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

use pcb_tests::up::Up;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcb_up_runs_every_stage_status_models_train_and_the_viewer_under_their_identities() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[pipeline]\ndata_dir = {:?}\n[nats]\nurl = \"\"\n\
             [stages.trainer.settings]\nthreads = 1\n\
             [stages.trainer.settings.model]\nbackbone = \"r18\"\nnorm = \"frozen\"\n\
             fpn_channels = 16\nbox_batch_size_per_image = 32\n\
             [stages.trainer.settings.model.transform]\nmin_size = 0\n\
             [stages.trainer.settings.optim]\nepochs = 1\nbatch_size = 2\naugment = false\ncrop = 0\n",
            data.display().to_string()
        ),
    )
    .expect("pipeline");
    let p = pipeline.to_str().expect("utf-8");
    let up = Up(Command::new(bin("pcb"))
        .args(["up", "--pipeline", p, "--viewer-addr", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pcb up"));
    let url_file = data.join("run").join("nats.url");
    let viewer_file = data.join("viewer.url");
    assert!(
        wait_until(Duration::from_secs(60), || {
            let ready = url_file.exists() && viewer_file.exists();
            async move { ready }
        })
        .await,
        "pcb up did not start"
    );
    let url = std::fs::read_to_string(&url_file).expect("url");
    let ids = IdentityStore::ensure(&data.join("identities")).expect("identities");
    for id in Identity::all() {
        assert_eq!(mode(&ids.secret_file(id)), 0o600, "{}", id.name());
    }
    for entry in std::fs::read_dir(data.join("run"))
        .expect("run dir")
        .flatten()
    {
        if entry.path().extension().is_some_and(|e| e == "toml") {
            assert_eq!(mode(&entry.path()), 0o600, "{}", entry.path().display());
        }
    }
    // Anonymous clients are refused by the pipeline's own server.
    assert!(async_nats::connect(url.trim()).await.is_err());

    // Boards in, detections out: ingester, encoder, router and detector as themselves.
    let boards = dir.path().join("boards");
    pcb_tests::synth_sized(&boards, 8, 5, 128, 0.25);
    let inbox = data.join("inbox");
    assert!(
        pcb_tests::drop_into(&boards, &inbox) >= 16,
        "boards and templates"
    );
    let (admin, _) = client_of(&ids, Identity::Admin, url.trim()).await;
    let js = jetstream::new(admin);
    let counted = wait_until(Duration::from_secs(180), || async {
        let Ok(mut s) = js.get_stream(pcb_schemas::STREAM_DETECTIONS).await else {
            return false;
        };
        s.info()
            .await
            .map(|i| i.state.messages >= 8)
            .unwrap_or(false)
    })
    .await;
    assert!(counted, "8 boards did not all get detections");

    pcb_prints(&["status", "--pipeline", p], "pcb.detections");
    let train = pcb(&["train", "--pipeline", p, "--ranks", "1", "--plain"]);
    assert!(train.status.success(), "{}", text(&train));
    // The rank's config holds the job's rendezvous secret, readable by its owner only.
    let rank_config = std::fs::read_dir(data.join("run"))
        .expect("run dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("trainer-"))
        })
        .expect("a rank config");
    assert_eq!(mode(&rank_config), 0o600);
    let secret = std::fs::read_to_string(&rank_config)
        .expect("rank config")
        .lines()
        .find_map(|l| {
            l.strip_prefix("rendezvous_secret = ")
                .map(|v| v.trim_matches('"').to_string())
        })
        .expect("a rendezvous secret");
    assert_eq!(secret.len(), 32, "{secret}");
    // The registry took the candidate from the trainer's object: version 2.
    let registered = wait_until(Duration::from_secs(60), || async {
        let models = pcb(&["models", "list", "--pipeline", p]);
        models.status.success()
            && text(&models).lines().any(|l| {
                l.split_whitespace()
                    .skip_while(|t| *t != "pcb-defects")
                    .nth(1)
                    == Some("2")
            })
    })
    .await;
    let models = pcb(&["models", "list", "--pipeline", p]);
    assert!(registered, "no version 2:\n{}", text(&models));

    // The viewer reads the streams and changes the live model with its identity.
    let base = std::fs::read_to_string(&viewer_file).expect("viewer url");
    let base = base.trim().trim_end_matches('/');
    let get = |path: &str| {
        Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{base}{path}"))
            .output()
            .expect("curl")
    };
    for path in [
        "/api/models",
        "/api/detections",
        "/api/overview",
        "/api/training",
    ] {
        let out = get(path);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{path}");
    }
    let promote = Command::new("curl")
        .args(["-s", "-X", "POST", "-H", "content-type: application/json"])
        .args(["-d", "{\"version\": 2}"])
        .arg(format!("{base}/api/models/pcb-defects/promote"))
        .output()
        .expect("curl");
    let answer = String::from_utf8_lossy(&promote.stdout).to_string();
    assert!(answer.contains("\"live\":2"), "{answer}");
    drop(up);

    let log = std::fs::read_to_string(data.join("nats").join("nats-server.log")).expect("log");
    let violations: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (deploy/setup.sh installs it)");
    assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_production_config_serves_the_issued_identities_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etc = dir.path().join("etc");
    let issued = pcb(&["identities", "--out", etc.to_str().expect("utf-8")]);
    assert!(issued.status.success(), "{}", text(&issued));
    assert_eq!(mode(&etc), 0o700);
    assert_eq!(mode(&etc.join("system.nk")), 0o600);
    let users = std::fs::read_to_string(etc.join("pcb-users.conf")).expect("users");
    assert!(
        users.contains("PCB_USERS") && users.contains("SYS_USERS"),
        "{users}"
    );

    // A CA and a server certificate for 127.0.0.1.
    let tls = etc.join("tls");
    std::fs::create_dir_all(&tls).expect("tls dir");
    openssl(
        &tls,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=pcb-test-ca",
        ],
    );
    openssl(
        &tls,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server-key.pem",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(tls.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    openssl(
        &tls,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );

    // The shipped file with its folders moved here and a free port.
    let port = pcb::server::free_port().expect("port");
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/nats-server.conf"),
    )
    .expect("deploy/nats/nats-server.conf");
    let conf_text = shipped
        .replace("/etc/nats/pcb", &etc.display().to_string())
        .replace(
            "/var/lib/nats/pcb",
            &dir.path().join("store").display().to_string(),
        )
        .replace("0.0.0.0:4222", &format!("127.0.0.1:{port}"))
        .replace(
            "0.0.0.0:8883",
            &format!("127.0.0.1:{}", pcb::server::free_port().expect("port")),
        );
    let conf = etc.join("nats-server.conf");
    std::fs::write(&conf, conf_text).expect("conf");
    let server_bin = pcb::server::find_binary().expect("nats-server");
    let check = Command::new(&server_bin)
        .arg("-c")
        .arg(&conf)
        .arg("-t")
        .output()
        .expect("nats-server -t");
    assert!(check.status.success(), "{}", text(&check));
    let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
    let _server = Server(
        Command::new(&server_bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server"),
    );
    assert!(
        wait_until(Duration::from_secs(15), || async move {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await
    );

    let ids = IdentityStore::ensure(&etc).expect("identities");
    let base = pcb_common::NatsConfig {
        url: format!("tls://127.0.0.1:{port}"),
        tls_ca_file: Some(tls.join("ca.pem")),
        ..Default::default()
    };
    // No credentials over TLS: refused.
    assert!(pcb_common::nats::connect_now(&base, "anonymous")
        .await
        .is_err());
    // The admin provisions, as `pcb init` does, in the PCB account's JetStream.
    let admin = pcb_common::nats::connect_now(&ids.connection(Identity::Admin, &base), "admin")
        .await
        .expect("admin over TLS");
    let admin_js = jetstream::new(admin);
    pcb_common::topology::provision_defaults(&admin_js)
        .await
        .expect("provisioned");
    // The encoder publishes its output and opens its durable with its own identity.
    let encoder_nats = ids.connection(Identity::Stage(StageName::Encoder), &base);
    let encoder = pcb_common::nats::connect_now(&encoder_nats, "encoder")
        .await
        .expect("encoder over TLS");
    let js = jetstream::new(encoder);
    js.publish("pcb.images.encoded", "probe".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    pcb_common::require(&js, StageName::Encoder)
        .await
        .expect("the encoder sees its streams");
    // `pcb` commands on this server, with the identities named in the pipeline file.
    let pipeline = dir.path().join("prod.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[pipeline]\ndata_dir = {:?}\nidentities_dir = {:?}\n\
             [nats]\nurl = \"tls://127.0.0.1:{port}\"\ntls_ca_file = {:?}\n",
            dir.path().join("data").display().to_string(),
            etc.display().to_string(),
            tls.join("ca.pem").display().to_string()
        ),
    )
    .expect("pipeline");
    let p = pipeline.to_str().expect("utf-8");
    pcb_prints(&["status", "--pipeline", p], "pcb.images.encoded");
    pcb_prints(&["init", "--pipeline", p], "unchanged");

    // The system account's user reaches the server's own subjects, not the pipeline's.
    let sys_seed = std::fs::read_to_string(etc.join("system.nk")).expect("seed");
    let sys = async_nats::ConnectOptions::new()
        .nkey(sys_seed.trim().to_string())
        .add_root_certificates(tls.join("ca.pem"))
        .require_tls(true)
        .connect(format!("tls://127.0.0.1:{port}"))
        .await
        .expect("system user");
    let varz = sys
        .request("$SYS.REQ.SERVER.PING.VARZ", "".into())
        .await
        .expect("the system account answers");
    assert!(
        String::from_utf8_lossy(&varz.payload).contains("pcb-nats-1"),
        "{}",
        String::from_utf8_lossy(&varz.payload)
    );
}
