//! Line-side MQTT: `pcb up` with `[nats_server] mqtt_port` opens the NATS server's own MQTT
//! listener, and a real MQTT client (paho-mqtt, as a PLC gateway would use) subscribed to
//! `pcb/verdicts/+` as `line-side` receives one verdict per board on its line's topic, the
//! same verdict `pcb.detections` stored. The identity reads nothing else and is refused on
//! a plain NATS connection.

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use pcb_schemas::{decode, line_token, Detection, STREAM_DETECTIONS};
use pcb_tests::up::Pipeline;
use pcb_tests::{read_all, venv_python};

const LINE_A: usize = 6;
const LINE_B: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plc_on_mqtt_receives_one_verdict_per_board_on_its_lines_topic() {
    let port = pcb::server::free_port().expect("port");
    // Each wave's folder names its line.
    let p = Pipeline::up_with(
        &[],
        &format!(
            "[nats_server]\nmqtt_port = {port}\n[stages.ingester.settings]\nline_from_dir = true\n"
        ),
    )
    .await;
    let said = p.said();
    assert!(
        said.contains(&format!("MQTT for line-side systems at 127.0.0.1:{port}")),
        "{said}"
    );
    let password_file = p.data.join("identities").join("line-side.password");
    let total = LINE_A + LINE_B;

    // The PLC: QoS 1 on every line's verdicts, and a try at the detections it may not read.
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/mqtt_verdicts.py");
    let mut plc = Command::new(venv_python())
        .arg(&script)
        .args(["--port", &port.to_string()])
        .arg("--password-file")
        .arg(&password_file)
        .args(["--topic", "pcb/verdicts/+", "--topic", "pcb/detections"])
        .args(["--count", &total.to_string(), "--timeout", "240"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    let stdout = plc.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let v = serde_json::from_str(&line).unwrap_or(serde_json::json!({ "raw": line }));
            if lines_tx.send(v).is_err() {
                break;
            }
        }
    });
    let first = lines_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the MQTT client subscribes");
    // Granted QoS 1 on the verdicts; 0x80 (refused) on what line-side may not read.
    assert_eq!(first["suback"], serde_json::json!([1, 128]), "{first}");

    p.wave("line-a", LINE_A, 11);
    p.wave("hall 2.east", LINE_B, 12);
    p.wait_detections(total as u64).await;

    let status = tokio::task::spawn_blocking(move || plc.wait_with_output())
        .await
        .expect("join")
        .expect("python exits");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let got: Vec<serde_json::Value> = lines_rx.try_iter().collect();

    let stored: Vec<Detection> = read_all(&p.js, STREAM_DETECTIONS, "pcb.detections")
        .await
        .iter()
        .map(|(_, payload)| decode(payload, None).expect("a detection"))
        .collect();
    assert_eq!(stored.len(), total);
    let mut per_line: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for msg in &got {
        assert!(msg.get("error").is_none(), "{msg}");
        let v = &msg["payload"];
        let image = v["image_id"].as_str().expect("image_id").to_string();
        let d = stored
            .iter()
            .find(|d| d.image_id == image)
            .unwrap_or_else(|| panic!("a verdict for no stored detection: {msg}"));
        assert_eq!(
            msg["topic"],
            format!("pcb/verdicts/{}", line_token(&d.line_id)),
            "{msg}"
        );
        assert_eq!(v["schema"], "pcb.verdicts/v1");
        assert_eq!(v["board_id"], d.board_id.as_str());
        assert_eq!(v["line_id"], d.line_id.as_str());
        assert_eq!(v["verdict"], d.verdict.as_str());
        assert_eq!(v["defects"], d.defects.len());
        assert_eq!(
            v["model"],
            format!("{}@{}", d.model.name, d.model.version).as_str()
        );
        *seen.entry(image).or_default() += 1;
        *per_line
            .entry(msg["topic"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), total, "one verdict per board: {got:?}");
    assert!(seen.values().all(|&n| n == 1), "no board twice: {seen:?}");
    // `hall 2.east` is one topic level: its space and `.` became `_`.
    assert_eq!(
        per_line,
        BTreeMap::from([
            ("pcb/verdicts/line-a".to_string(), LINE_A),
            ("pcb/verdicts/hall_2_east".to_string(), LINE_B),
        ])
    );
    let fails = got
        .iter()
        .filter(|m| m["payload"]["verdict"] == "fail")
        .count();
    let qos: std::collections::BTreeSet<u64> =
        got.iter().filter_map(|m| m["qos"].as_u64()).collect();
    // Published on core NATS, so the server delivers at QoS 0 (README, "Delivery").
    assert_eq!(qos, [0].into(), "{got:?}");
    eprintln!(
        "MQTT: {} verdicts for {total} boards ({fails} fail) on {} topics, delivered at QoS {qos:?}",
        got.len(),
        per_line.len()
    );

    // The password admits MQTT only: a NATS client with it is refused.
    let password = std::fs::read_to_string(&password_file).expect("password");
    let url = std::fs::read_to_string(p.data.join("run").join("nats.url")).expect("url");
    let nats = async_nats::ConnectOptions::with_user_and_password(
        "line-side".into(),
        password.trim().into(),
    )
    .max_reconnects(Some(1))
    .connect(url.trim())
    .await;
    assert!(nats.is_err(), "line-side connected over NATS");
}
