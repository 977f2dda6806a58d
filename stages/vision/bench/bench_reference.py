"""Reference timings for `pcb bench vision`: torchvision and ONNX Runtime on the same
model (Faster R-CNN, ResNet-50 or ResNet-18 FPN, frozen batch norm, 7 classes), the same
deterministic weights and the same 640x640 input as the Rust side, on this machine.

Prints one JSON object on stdout. Needs torch==2.11.0, torchvision==0.26.0, and for the ONNX
rows onnxruntime, onnx and onnxscript (see deploy/requirements-bench.txt).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "parity"))
import make_golden as mg  # noqa: E402


def build(depth, size):
    mg.MIN_SIZE, mg.MAX_SIZE = size, size
    return mg.build(depth)


def timed(fn, iters):
    fn()  # warm-up: allocator, oneDNN kernel selection
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def targets(size):
    s = size / 160.0
    return [{"boxes": t["boxes"] * s, "labels": t["labels"]} for t in mg.targets()[:1]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--models", default="r50,r18")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": {}}
    img = mg.image("bench", args.size, args.size)
    for depth in args.models.split(","):
        row = {}
        model = build(depth, args.size)
        model.eval()
        with torch.no_grad():
            row["torchvision_infer_s"] = timed(lambda: model([img]), args.iters)
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)

        def step():
            opt.zero_grad()
            loss = sum(model([img], targets(args.size)).values())
            loss.backward()
            opt.step()

        row["torchvision_train_s"] = timed(step, args.iters)
        try:
            import onnxruntime as ort

            model.eval()
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "m.onnx")
                torch.onnx.export(model, ([img],), path, opset_version=17, dynamo=False)
                so = ort.SessionOptions()
                if args.threads > 0:
                    so.intra_op_num_threads = args.threads
                sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                name = sess.get_inputs()[0].name
                feed = {name: img.numpy()}
                row["onnxruntime_infer_s"] = timed(lambda: sess.run(None, feed), args.iters)
        except Exception as e:  # the ONNX rows are optional; say why they are missing
            row["onnxruntime_error"] = f"{type(e).__name__}: {e}"[:300]
        out["rows"][depth] = row
        print(depth, row, file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
