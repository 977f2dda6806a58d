"""Reference timings for `pcb bench vision`: torchvision (f32 and bf16 autocast), ONNX Runtime
and OpenVINO (f32 and bf16) on the same model (Faster R-CNN, frozen batch norm, 7 classes:
ResNet-50 FPN, ResNet-18 FPN, or the compact ResNet-18 of pipelines/models/deeppcb-compact),
the same deterministic weights and the same 640x640 input as the Rust side, on this machine.

Prints one JSON object on stdout: per model, torchvision's f32 seconds (the ratios' base),
every reference path's seconds (or why it is missing), torchvision's detections on the bench
input (the Rust side compares its own against them) and notes (what OpenVINO compiled to).
Needs torch==2.11.0, torchvision==0.26.0, and for the ONNX Runtime and OpenVINO rows
onnxruntime, onnx, onnxscript and openvino (see deploy/requirements-bench.txt).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.resnet import BasicBlock, conv1x1
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "parity"))
import make_golden as mg  # noqa: E402

# pcb_vision::ModelConfig of the compact model (pipelines/models/deeppcb-compact/model.json):
# ResNet-18 with a 16-wide stem, 64 FPN channels, a 256-wide box head, 300 proposals at
# inference. Its box_batch_size_per_image (128) is left at torchvision's 512 on both sides so
# that the training rows compare like with like.
COMPACT = {"backbone_width": 16, "fpn_channels": 64, "representation_size": 256, "test_proposals": 300}

# Detections compared: torchvision's top 20 (the tail holds near-equal scores, as in
# stages/libs/vision/tests/parity.rs), box coordinates relative to at least 10 px.
TOP, BOX_FLOOR = 20, 10.0


class CompactResNet(nn.Module):
    """torchvision's ResNet-18 body with a `width`-wide stem (torchvision hard-codes 64):
    the same modules (BasicBlock, conv1x1 downsample) under the same names, so that
    `pcb_vision::testing::fill` and `mg.parameter` give both sides the same weights."""

    def __init__(self, width, norm_layer=FrozenBatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = width
        for i in range(4):
            planes = width << i
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or self.inplanes != planes:
                downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), norm_layer(planes))
            blocks = [BasicBlock(self.inplanes, planes, stride, downsample, norm_layer=norm_layer)]
            blocks.append(BasicBlock(planes, planes, norm_layer=norm_layer))
            self.inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))


def build_compact(size):
    width = COMPACT["backbone_width"]
    # BackboneWithFPN rather than _resnet_fpn_extractor: the latter fixes 256 FPN channels.
    # All layers trainable, as _resnet_fpn_extractor(body, 5) leaves them for r50/r18.
    backbone = BackboneWithFPN(
        CompactResNet(width),
        {f"layer{i + 1}": str(i) for i in range(4)},
        [width << i for i in range(4)],
        COMPACT["fpn_channels"],
        extra_blocks=LastLevelMaxPool(),
    )
    rep = COMPACT["representation_size"]
    model = FasterRCNN(
        backbone,
        min_size=size,
        max_size=size,
        rpn_pre_nms_top_n_test=COMPACT["test_proposals"],
        rpn_post_nms_top_n_test=COMPACT["test_proposals"],
        box_head=TwoMLPHead(COMPACT["fpn_channels"] * 7 * 7, rep),
        box_predictor=FastRCNNPredictor(rep, 7),
    )
    sd = model.state_dict()
    model.load_state_dict({k: mg.parameter(k, list(v.shape)) for k, v in sd.items()}, strict=True)
    return model


def build(depth, size):
    if depth == "compact":
        return build_compact(size)
    if depth not in ("r50", "r18"):
        raise SystemExit(f"unknown model {depth} (r50, r18 or compact)")
    mg.MIN_SIZE, mg.MAX_SIZE = size, size
    return mg.build(depth)


# Each timing runs at least this long (--min-seconds; the same rule as ours): a few
# calls of a 15 ms model are at the mercy of one scheduler hiccup.
MIN_SECONDS = 0.0


def timed(fn, iters):
    """Seconds per call after a warm-up (the mean of at least `iters` calls and at least
    MIN_SECONDS), and the last call's result (the detections to compare: another call just
    for them would cost minutes where bf16 is emulated)."""
    out = fn()  # warm-up: allocator, oneDNN kernel selection
    t = time.perf_counter()
    n = 0
    while n < max(iters, 1) or time.perf_counter() - t < MIN_SECONDS:
        out = fn()
        n += 1
    return (time.perf_counter() - t) / n, out


def targets(size):
    s = size / 160.0
    return [{"boxes": t["boxes"] * s, "labels": t["labels"]} for t in mg.targets()[:1]]


def sci(x):
    """1.2e-5 rather than Python's 1.2e-05: the Rust side's notation, in the same table."""
    m, e = f"{x:.1e}".split("e")
    return f"{m}e{int(e)}"


def agreement(boxes, labels, scores, ref):
    """How one path's detections match torchvision's f32 ones `ref` (the Rust side's
    `agreement` is the same measure): each of torchvision's top 20 is matched to the path's
    nearest box of the same label anywhere in its list, since near-equal scores come out in
    either order (seen: ONNX Runtime swapping two R18-FPN detections)."""
    boxes = torch.as_tensor(boxes).double().reshape(-1, 4)
    labels, scores = torch.as_tensor(labels).long(), torch.as_tensor(scores).double()
    n = min(TOP, len(ref["scores"]))
    unmatched, worst_box, worst_score = 0, 0.0, 0.0
    for k in range(n):
        rb = ref["boxes"][k].double()
        same = (labels == ref["labels"][k]).nonzero().flatten()
        if len(same) == 0:
            unmatched += 1
            continue
        d = ((boxes[same] - rb).abs() / rb.abs().clamp(min=BOX_FLOOR)).max(dim=1).values
        j = int(d.argmin())
        worst_box = max(worst_box, float(d[j]))
        worst_score = max(worst_score, abs(float(scores[same[j]]) - float(ref["scores"][k])))
    return (
        f"{len(scores)} vs {len(ref['scores'])} detections, top {n}: {unmatched} unmatched, "
        f"box {sci(worst_box)}, score {sci(worst_score)}"
    )


def error(e):
    return f"{type(e).__name__}: {e}"[:300]


def native_bf16():
    """Whether this CPU computes bf16 natively (oneDNN's check: AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def openvino_rows(onnx_path, img, threads, iters, ref, bf16):
    """OpenVINO from the ONNX file the ONNX Runtime row runs: ov.convert_model on the torch
    module traces it with TorchScript, which rejects Faster R-CNN's list-of-dicts output."""
    import openvino as ov

    core = ov.Core()
    ov_model = ov.convert_model(onnx_path)
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    native_bf16 = "BF16" in caps
    rows, notes = [], []
    for hint in ("f32", "bf16") if bf16 else ("f32",):
        compiled = core.compile_model(
            ov_model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint}
        )
        # What it compiled to, not what was asked: without native bf16 the CPU plugin may
        # keep f32 (or emulate bf16), and the row must say which one it timed.
        used = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        used_threads = compiled.get_property("INFERENCE_NUM_THREADS")
        path = f"OpenVINO {hint}"
        if hint == "bf16" and used != "bf16":
            path += f" (ran {used}{'' if native_bf16 else ': no native bf16'})"
        elif hint == "bf16" and not native_bf16:
            path += " (emulated)"
        notes.append(f"OpenVINO {ov.__version__.split('-')[0]}: {hint} hint compiled to {used}, {used_threads} threads")
        req = compiled.create_infer_request()
        feed = {0: img.numpy()}
        # infer() copies the outputs out of the request (share_outputs=False).
        s, res = timed(lambda: req.infer(feed), iters)
        out = [torch.from_numpy(v) for v in res.values()]
        rows.append({"path": path, "infer_s": s, "agreement": agreement(*out, ref)})
    notes.append(f"OpenVINO CPU capabilities: {' '.join(caps)} (native bf16: {'yes' if native_bf16 else 'no'})")
    return rows, notes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=0.0)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--models", default="r50,r18")
    # auto: the bf16 rows only where the CPU has native bf16 (emulated autocast takes
    # minutes per image); on: always; off: never.
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto")
    args = ap.parse_args()
    global MIN_SECONDS
    MIN_SECONDS = args.min_seconds
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16())
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # OpenVINO gets torch's count even when 0 lets torch choose (one per core), so that every
    # framework runs on the same number of threads.
    threads = torch.get_num_threads()
    out = {"threads": threads, "torch": torch.__version__, "rows": {}}
    img = mg.image("bench", args.size, args.size)
    for depth in args.models.split(","):
        paths, notes = [], []
        model = build(depth, args.size)
        # Every inference path first, on the weights the Rust side has: the training steps
        # at the end move them.
        model.eval()
        with torch.no_grad():
            tv_infer, dets = timed(lambda: model([img]), args.iters)
            ref = {k: v.detach() for k, v in dets[0].items()}
        paths.append({"path": "torchvision", "infer_s": tv_infer})
        if not bf16:
            paths.append({"path": "torchvision, bf16 autocast", "error": "left out: no native bf16 on this CPU (--bf16 on times the emulation)"})
        else:
            try:
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    s, dets = timed(lambda: model([img]), args.iters)
                    d = dets[0]
                paths.append(
                    {
                        "path": "torchvision, bf16 autocast",
                        "infer_s": s,
                        "agreement": agreement(d["boxes"].float(), d["labels"], d["scores"].float(), ref),
                    }
                )
            except Exception as e:  # optional like the rows below; say why it is missing
                paths.append({"path": "torchvision, bf16 autocast", "error": error(e)})
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = os.path.join(tmp, "m.onnx")
            try:
                torch.onnx.export(model, ([img],), onnx_path, opset_version=17, dynamo=False)
            except Exception as e:
                onnx_path = None
                paths.append({"path": "ONNX Runtime, OpenVINO", "error": "ONNX export: " + error(e)})
            if onnx_path:
                try:
                    import onnxruntime as ort

                    so = ort.SessionOptions()
                    if args.threads > 0:
                        so.intra_op_num_threads = args.threads
                    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
                    feed = {sess.get_inputs()[0].name: img.numpy()}
                    s, res = timed(lambda: sess.run(None, feed), args.iters)
                    o = [torch.from_numpy(v) for v in res]
                    paths.append({"path": "ONNX Runtime", "infer_s": s, "agreement": agreement(*o, ref)})
                except Exception as e:
                    paths.append({"path": "ONNX Runtime", "error": error(e)})
                try:
                    rows, ov_notes = openvino_rows(onnx_path, img, threads, args.iters, ref, bf16)
                    paths.extend(rows)
                    notes.extend(ov_notes)
                except Exception as e:
                    paths.append({"path": "OpenVINO", "error": error(e)})
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)

        def step():
            opt.zero_grad()
            loss = sum(model([img], targets(args.size)).values())
            loss.backward()
            opt.step()

        tv_train, _ = timed(step, args.iters)
        paths[0]["train_s"] = tv_train
        row = {
            "torchvision_infer_s": tv_infer,
            "torchvision_train_s": tv_train,
            "paths": paths,
            "notes": notes,
            "detections": {k: v.tolist() for k, v in ref.items()},
        }
        out["rows"][depth] = row
        print(depth, json.dumps({"paths": paths, "notes": notes}), file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
