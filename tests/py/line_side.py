"""A line-side system in a few lines: subscribe to pcb.detections with nats-py and msgpack
and print each board's verdict. With --count N it reads the stream from the start and stops
after N messages (how the tests use it); without, it follows new detections forever.

    .venv/bin/python tests/py/line_side.py nats://127.0.0.1:4222
    .venv/bin/python tests/py/line_side.py $(cat .pcb-data/run/nats.url) --nkey .pcb-data/identities/reader.nk

--nkey names the seed file of an identity `pcb up` issued (the read-only `reader` is the one
for line-side systems); its replies then come on that identity's own inbox prefix,
_INBOX_<identity>, the only one it may subscribe to.
"""
import argparse
import asyncio
import pathlib

import msgpack
import nats


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--count", type=int, default=0, help="stop after N (read from the start)")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--nkey", help="seed file of a pcb identity (e.g. .pcb-data/identities/reader.nk)")
    args = ap.parse_args()
    login = {}
    if args.nkey:
        identity = pathlib.Path(args.nkey).stem
        login = {"nkeys_seed": args.nkey, "inbox_prefix": f"_INBOX_{identity}".encode()}
    nc = await nats.connect(args.url, **login)
    js = nc.jetstream()
    policy = "all" if args.count else "new"
    sub = await js.subscribe("pcb.detections", ordered_consumer=True, deliver_policy=policy)
    seen = 0
    verdicts = {"pass": 0, "fail": 0}
    while not args.count or seen < args.count:
        msg = await sub.next_msg(timeout=args.timeout)
        d = msgpack.unpackb(msg.data, raw=False)
        seen += 1
        verdicts[d["verdict"]] = verdicts.get(d["verdict"], 0) + 1
        worst = max((x["score"] for x in d["defects"]), default=0.0)
        print(
            f'{d["line_id"]} {d["board_id"]}: {d["verdict"].upper()} '
            f'({len(d["defects"])} defects, top score {worst:.2f}) '
            f'by {d["model"]["name"]}@{d["model"]["version"]} in {d["inference_ms"]:.1f} ms'
        )
    print(f"received {seen} pass {verdicts['pass']} fail {verdicts['fail']}")
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
