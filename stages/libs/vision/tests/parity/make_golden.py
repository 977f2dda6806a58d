"""Golden numbers for the parity tests of pcb-vision against torchvision.

Builds torchvision's Faster R-CNN (ResNet-50 and ResNet-18 FPN, frozen batch norm, 7
classes), fills every tensor of its state_dict with the deterministic values of
`pcb_vision::testing::parameter` (re-implemented here bit for bit), runs two deterministic
images through it in eval mode and the training losses with first-in-order sampling, and
writes what the Rust test compares to `golden_<backbone>.json`, plus the state_dict key
names and shapes to `keys_<backbone>.json`.

    python make_golden.py            # writes the JSON files beside this script
    python make_golden.py --export r50.safetensors   # also the weights, for other uses

Needs torch==2.11.0 and torchvision==0.26.0 (CPU is enough).
"""

import argparse
import json
import math
import os

import numpy as np
import torch
import torchvision
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

HERE = os.path.dirname(os.path.abspath(__file__))
MASK64 = (1 << 64) - 1
MIN_SIZE, MAX_SIZE = 128, 224
SIZES = [(100, 150), (120, 90)]


def fnv1a64(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h ^= b
        h = (h * 0x100000001B3) & MASK64
    return h


def uniform(name, n):
    """Same values as pcb_vision::testing::uniform."""
    with np.errstate(over="ignore"):
        z = (np.uint64(fnv1a64(name)) + np.arange(n, dtype=np.uint64)) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float64)
    return 2.0 * u / 16777216.0 - 1.0


def parameter(name, shape):
    n = int(np.prod(shape)) if len(shape) else 1
    x = uniform(name, n)
    leaf = name.rsplit(".", 1)[-1]
    is_norm = ".bn" in name or "downsample.1." in name
    if leaf == "weight" and not is_norm:
        fan_in = max(int(np.prod(shape[1:])), 1)
        v = x * math.sqrt(3.0 / fan_in)
    elif leaf == "weight" and is_norm:
        v = 1.0 + 0.25 * x
    elif leaf == "running_var":
        v = 1.0 + 0.5 * x
    elif leaf in ("running_mean", "bias"):
        v = 0.1 * x
    else:
        v = x
    return torch.from_numpy(v.astype(np.float32)).reshape(shape)


def image(name, h, w):
    return torch.from_numpy((0.5 + 0.5 * uniform(name, 3 * h * w)).astype(np.float32)).reshape(3, h, w)


class FirstSampler:
    """torchvision's BalancedPositiveNegativeSampler, taking the first ones in order."""

    def __init__(self, batch, fraction):
        self.batch, self.fraction = batch, fraction

    def __call__(self, matched_idxs):
        pos_out, neg_out = [], []
        for m in matched_idxs:
            pos = torch.where(m >= 1)[0]
            neg = torch.where(m == 0)[0]
            num_pos = min(pos.numel(), int(self.batch * self.fraction))
            num_neg = min(neg.numel(), self.batch - num_pos)
            pm = torch.zeros_like(m, dtype=torch.uint8)
            nm = torch.zeros_like(m, dtype=torch.uint8)
            pm[pos[:num_pos]] = 1
            nm[neg[:num_neg]] = 1
            pos_out.append(pm)
            neg_out.append(nm)
        return pos_out, neg_out


def build(depth):
    body = (resnet50 if depth == "r50" else resnet18)(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, 5)
    model = FasterRCNN(backbone, num_classes=7, min_size=MIN_SIZE, max_size=MAX_SIZE)
    sd = model.state_dict()
    model.load_state_dict({k: parameter(k, list(v.shape)) for k, v in sd.items()}, strict=True)
    return model


def sample(t, n=256):
    flat = t.detach().reshape(-1)
    step = max(flat.numel() // n, 1)
    idx = torch.arange(0, flat.numel(), step)[:n]
    return {
        "shape": list(t.shape),
        "step": step,
        "values": flat[idx].tolist(),
        "max_abs": float(flat.abs().max()),
        "sum": float(flat.double().sum()),
    }


def targets():
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 50.0], [80.0, 20.0, 140.0, 90.0]]), "labels": torch.tensor([1, 4])},
        {"boxes": torch.tensor([[5.0, 30.0, 70.0, 110.0]]), "labels": torch.tensor([6])},
    ]


def golden(depth):
    torch.manual_seed(0)
    model = build(depth)
    imgs = [image(f"img{i}", h, w) for i, (h, w) in enumerate(SIZES)]
    model.eval()
    with torch.no_grad():
        il, _ = model.transform(imgs)
        feats = model.backbone(il.tensors)
        obj, _ = model.rpn.head(list(feats.values()))
        props, _ = model.rpn(il, feats)
        dets, _ = model.roi_heads(feats, props, il.image_sizes)
        dets = model.transform.postprocess(dets, il.image_sizes, [tuple(i.shape[-2:]) for i in imgs])
        direct = model(imgs)
        for a, b in zip(dets, direct):
            assert torch.equal(a["boxes"], b["boxes"])
    out = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "min_size": MIN_SIZE,
        "max_size": MAX_SIZE,
        "sizes": SIZES,
        "image_sizes": [list(s) for s in il.image_sizes],
        "batch_shape": list(il.tensors.shape),
        "features": {k: sample(v) for k, v in feats.items()},
        "objectness": [sample(o) for o in obj],
        "proposals": [{"count": p.shape[0], "first": p[:50].tolist()} for p in props],
        "detections": [
            {"boxes": d["boxes"].tolist(), "labels": d["labels"].tolist(), "scores": d["scores"].tolist()}
            for d in dets
        ],
    }
    model.train()
    model.rpn.fg_bg_sampler = FirstSampler(256, 0.5)
    model.roi_heads.fg_bg_sampler = FirstSampler(512, 0.25)
    losses = model(imgs, targets())
    out["losses"] = {k: float(v.detach()) for k, v in losses.items()}
    out["targets"] = [{"boxes": t["boxes"].tolist(), "labels": t["labels"].tolist()} for t in targets()]
    keys = {k: list(v.shape) for k, v in model.state_dict().items()}
    return out, keys, model


def ops_cases():
    """Random NMS and RoI align cases with torchvision's answers (inputs stored too)."""
    from torchvision.ops import nms, roi_align

    cases = {"nms": [], "roi_align": []}
    for c in range(6):
        n = 40 + 30 * c
        u = uniform(f"nms{c}", 5 * n).reshape(5, n)
        x1 = 100.0 * (u[0] + 1.0)
        y1 = 100.0 * (u[1] + 1.0)
        w = 5.0 + 20.0 * (u[2] + 1.0)
        h = 5.0 + 20.0 * (u[3] + 1.0)
        boxes = torch.from_numpy(np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float32))
        scores = torch.from_numpy((0.5 + 0.5 * u[4]).astype(np.float32))
        thr = [0.3, 0.5, 0.7][c % 3]
        keep = nms(boxes, scores, thr)
        cases["nms"].append({"boxes": boxes.tolist(), "scores": scores.tolist(), "iou": thr, "keep": keep.tolist()})
    for c in range(6):
        n, ch, h, w = 2, 3, 12 + c, 16 + 2 * c
        feat = torch.from_numpy(uniform(f"feat{c}", n * ch * h * w).astype(np.float32)).reshape(n, ch, h, w)
        k = 10
        u = uniform(f"rois{c}", 5 * k).reshape(5, k)
        scale = [0.25, 0.5, 1.0][c % 3]
        # Boxes in image pixels, some reaching past the map's border.
        bx1 = (u[0] + 1.0) * 0.6 * w / scale - 4.0 / scale
        by1 = (u[1] + 1.0) * 0.6 * h / scale - 4.0 / scale
        bw = (u[2] + 1.2) * 4.0 / scale
        bh = (u[3] + 1.2) * 4.0 / scale
        bi = (u[4] > 0).astype(np.float64)
        rois = torch.from_numpy(np.stack([bi, bx1, by1, bx1 + bw, by1 + bh], 1).astype(np.float32))
        ratio = [2, 1, 3][c % 3]
        aligned = c >= 3
        out = roi_align(feat, rois, (7, 7), spatial_scale=scale, sampling_ratio=ratio, aligned=aligned)
        cases["roi_align"].append(
            {
                "input": feat.reshape(-1).tolist(),
                "shape": [n, ch, h, w],
                "rois": rois.tolist(),
                "scale": scale,
                "sampling_ratio": ratio,
                "aligned": aligned,
                "output": out.reshape(-1).tolist(),
            }
        )
    with open(os.path.join(HERE, "golden_ops.json"), "w") as f:
        json.dump(cases, f)
    print("ops cases written")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", help="also write the R50 weights to this safetensors file")
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    ops_cases()
    for depth in ("r50", "r18"):
        out, keys, model = golden(depth)
        with open(os.path.join(HERE, f"golden_{depth}.json"), "w") as f:
            json.dump(out, f, indent=1)
        with open(os.path.join(HERE, f"keys_{depth}.json"), "w") as f:
            json.dump(keys, f, indent=1, sort_keys=True)
        print(depth, "losses", out["losses"], "detections", [len(d["scores"]) for d in out["detections"]])
        if args.export and depth == "r50":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.export)
            print("wrote", args.export)


if __name__ == "__main__":
    main()
