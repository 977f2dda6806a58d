"""A PLC's view of the pipeline: subscribe over MQTT to every line's verdicts and print each
as one JSON line. The NATS server's own MQTT listener serves them (`pcb up` with
[nats_server] mqtt_port); the user is `line-side`, its password in the identities folder.

    .venv/bin/python tests/py/mqtt_verdicts.py --port 1883 \
        --password-file .pcb-data/identities/line-side.password

It prints {"suback": [...]} once subscribed (the granted QoS per topic, 128 for a refusal),
then {"topic": ..., "payload": {...}} per verdict. With --count N it stops --linger seconds
after the Nth verdict (so a duplicate would still show), or at --timeout.
"""
import argparse
import json
import pathlib
import sys
import time

import paho.mqtt.client as mqtt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--password-file", required=True)
    ap.add_argument("--topic", action="append", help="topic filter (repeatable); default pcb/verdicts/+")
    ap.add_argument("--qos", type=int, default=1)
    ap.add_argument("--count", type=int, default=0, help="stop after N verdicts (0: never)")
    ap.add_argument("--linger", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    topics = args.topic or ["pcb/verdicts/+"]
    password = pathlib.Path(args.password_file).read_text().strip()

    received = []

    def say(obj):
        print(json.dumps(obj), flush=True)

    def on_connect(client, _userdata, _flags, reason, _props):
        if reason.is_failure:
            say({"error": f"connect refused: {reason}"})
            client.disconnect()
            return
        client.subscribe([(t, args.qos) for t in topics])

    def on_subscribe(_client, _userdata, _mid, reasons, _props):
        say({"suback": [r.value for r in reasons]})

    def on_message(_client, _userdata, msg):
        payload = json.loads(msg.payload)
        received.append(payload)
        say({"topic": msg.topic, "qos": msg.qos, "payload": payload})

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="pcb-test-plc", protocol=mqtt.MQTTv311
    )
    client.username_pw_set("line-side", password)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(args.host, args.port, keepalive=30)
    client.loop_start()
    deadline = time.monotonic() + args.timeout
    done_at = None
    while time.monotonic() < deadline:
        if args.count and done_at is None and len(received) >= args.count:
            done_at = time.monotonic()
        if done_at is not None and time.monotonic() - done_at >= args.linger:
            break
        if not client.is_connected() and time.monotonic() > deadline - args.timeout + 10:
            say({"error": "not connected"})
            break
        time.sleep(0.05)
    client.loop_stop()
    client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
