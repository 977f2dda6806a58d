"""Reads every pipeline stream from the start with nats-py (a plain, non-Rust client) and
prints, as JSON, the number of messages per subject and the decoded field names seen, so
the Rust side's `pcb status` can be checked against an independent reader."""
import asyncio
import json
import sys

import msgpack
import nats
from nats.errors import TimeoutError as NatsTimeout

STREAMS = ["PCB_IMAGES", "PCB_SHARDS", "PCB_DETECTIONS", "PCB_REJECTED"]


async def main(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    counts: dict[str, int] = {}
    fields: dict[str, list[str]] = {}
    for stream in STREAMS:
        info = await js.stream_info(stream)
        total = info.state.messages
        if total == 0:
            continue
        sub = await js.subscribe(">", stream=stream, ordered_consumer=True, deliver_policy="all")
        seen = 0
        while seen < total:
            try:
                msg = await sub.next_msg(timeout=10)
            except NatsTimeout:
                break
            seen += 1
            counts[msg.subject] = counts.get(msg.subject, 0) + 1
            body = msgpack.unpackb(msg.data, raw=False)
            key = msg.subject.rsplit(".", 1)[0] if msg.subject.startswith("pcb.shards.") else msg.subject
            fields.setdefault(key, sorted(body.keys()))
            assert msg.headers and msg.headers.get("Content-Type") == "application/msgpack"
        await sub.unsubscribe()
    await nc.close()
    print(json.dumps({"counts": counts, "fields": fields}, sort_keys=True))


asyncio.run(main(sys.argv[1]))
