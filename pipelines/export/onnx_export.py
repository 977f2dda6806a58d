"""Exports one of our detectors (safetensors + model.json, as `pcb train` or
`pcb models export` write them) to ONNX, through torchvision's own Faster R-CNN.

Our model (stages/libs/vision) is torchvision's Faster R-CNN rebuilt on tch with torchvision's
parameter names, so the export builds torchvision's model to match model.json exactly,
loads our tensors into it under strict name and shape checks, and lets torch's
TorchScript-based exporter trace it (torchvision ships ONNX symbolics for its RoI align
and NMS on that path).

The graph takes what a user has, not what the network eats:

* `input: image_template_diff` models: `image` and `template`, each `[1, 1, H, W]` float32
  grey in [0, 1]; the three channels (image, template, |image - template|) are composed
  inside the graph exactly as `pcb_vision::compose` does;
* `input: image` models: `image` alone, `[1, 1, H, W]`, replicated to three channels.

Normalisation, the resize rule (`min_size: 0` keeps the size) and the padding to a
multiple of 32 are in the graph too. Outputs: `boxes` `[N, 4]` float32 (x1 y1 x2 y2 in the
input's pixels), `labels` `[N]` int64 (1..num_classes-1), `scores` `[N]` float32, best
first, at most 100, score >= 0.05 (torchvision's box defaults, which ours follow). H and W
are dynamic; `--height/--width` only size the example the tracer runs.

    python onnx_export.py --weights model.safetensors --config model.json --out model.onnx
    python onnx_export.py ... --check   # also compares onnxruntime with torch on a board

Needs torch==2.11.0, torchvision==0.26.0, onnx, onnxruntime (for --check), safetensors,
numpy and Pillow (for --check's JPEGs): deploy/requirements-bench.txt.
"""

import argparse
import hashlib
import json
import os
import sys
import warnings

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
OPSET = 17

# The RPN and box stage settings of pcb_vision (stages/libs/vision/src/rpn.rs
# `RpnSettings::default`, roi_heads.rs `BoxSettings::default`, the anchors of
# `AnchorGenerator::default`). They are torchvision's defaults; passing them explicitly
# keeps the export right should either side's defaults move.
ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
ANCHOR_RATIOS = ((0.5, 1.0, 2.0),) * 5
RPN = dict(
    rpn_nms_thresh=0.7,
    rpn_fg_iou_thresh=0.7,
    rpn_bg_iou_thresh=0.3,
    rpn_batch_size_per_image=256,
    rpn_positive_fraction=0.5,
    rpn_score_thresh=0.0,
    rpn_pre_nms_top_n_train=2000,
    rpn_post_nms_top_n_train=2000,
)
BOX = dict(
    box_score_thresh=0.05,
    box_nms_thresh=0.5,
    box_detections_per_img=100,
    box_fg_iou_thresh=0.5,
    box_bg_iou_thresh=0.5,
    box_positive_fraction=0.25,
)


class StemWidthResNet(ResNet):
    """torchvision's ResNet with the stem `width` channels wide and stage i `width << i`
    planes (torchvision hard-codes 64); the same module names, so the same state_dict
    keys as pcb_vision's `ResNet::new(.., width)`."""

    def __init__(self, block, layers, width, norm_layer):
        nn.Module.__init__(self)
        self._norm_layer = norm_layer
        self.inplanes = width
        self.dilation = 1
        # groups 1 and base_width 64 make a Bottleneck's inner width its `planes`, as ours.
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        # No avgpool/fc: the FPN's IntermediateLayerGetter stops at layer4 and our
        # checkpoints have no classifier.


class KeepSizeTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform for `min_size: 0`: every image keeps its own size (our
    `Transform::resized_size`), where torchvision would always rescale; normalisation and
    the padding to 32 stay torchvision's."""

    def resize(self, image, target=None):
        return image, target


def load_config(path):
    with open(path) as f:
        cfg = json.load(f)
    # pcb_vision's serde defaults for fields an older model.json may lack.
    defaults = {
        "num_classes": 7,
        "backbone": "r50",
        "norm": "frozen",
        "input": "image_template_diff",
        "fpn_channels": 256,
        "box_batch_size_per_image": 512,
        "backbone_width": 64,
        "representation_size": 1024,
        "test_proposals": 1000,
    }
    transform = {"min_size": 800, "max_size": 1333, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    transform.update(cfg.get("transform", {}))
    out = {**defaults, **cfg, "transform": transform}
    unknown = set(out) - set(defaults) - {"transform"}
    if unknown:
        sys.exit(f"{path}: fields this exporter does not know: {sorted(unknown)}")
    if out["backbone"] not in ("r18", "r50") or out["norm"] not in ("frozen", "batch"):
        sys.exit(f"{path}: backbone must be r18|r50 and norm frozen|batch, got {out['backbone']}, {out['norm']}")
    if out["input"] not in ("image", "image_template_diff"):
        sys.exit(f"{path}: input must be image|image_template_diff, got {out['input']}")
    return out


def build(cfg):
    """torchvision's FasterRCNN shaped and set up as pcb_vision's `FasterRcnn::new(cfg)`."""
    block, layers, expansion = {
        "r18": (BasicBlock, [2, 2, 2, 2], 1),
        "r50": (Bottleneck, [3, 4, 6, 3], 4),
    }[cfg["backbone"]]
    width = cfg["backbone_width"]
    # Frozen batch norm for `norm: batch` too: at inference a batch norm is its running
    # statistics, which a FrozenBatchNorm2d holds under the same names.
    body = StemWidthResNet(block, layers, width, FrozenBatchNorm2d)
    ch = cfg["fpn_channels"]
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
        in_channels_list=[width * expansion * 2**i for i in range(4)],
        out_channels=ch,
        extra_blocks=LastLevelMaxPool(),
    )
    t = cfg["transform"]
    rep = cfg["representation_size"]
    model = FasterRCNN(
        backbone,
        num_classes=None,  # given by box_predictor
        min_size=max(t["min_size"], 1),
        max_size=t["max_size"],
        image_mean=list(t["mean"]),
        image_std=list(t["std"]),
        rpn_anchor_generator=AnchorGenerator(ANCHOR_SIZES, ANCHOR_RATIOS),
        rpn_pre_nms_top_n_test=cfg["test_proposals"],
        rpn_post_nms_top_n_test=cfg["test_proposals"],
        box_head=TwoMLPHead(ch * 7 * 7, rep),
        box_predictor=FastRCNNPredictor(rep, cfg["num_classes"]),
        box_batch_size_per_image=cfg["box_batch_size_per_image"],
        **RPN,
        **BOX,
    )
    if t["min_size"] <= 0:
        model.transform = KeepSizeTransform(1, t["max_size"], list(t["mean"]), list(t["std"]))
    return model.eval()


def load_weights(model, path):
    """Loads our safetensors into `model`, refusing any missing, unexpected or mis-shaped
    tensor; `num_batches_tracked` (a trainable batch norm's counter, meaningless at
    inference) is tolerated either way."""
    from safetensors.torch import load_file

    ours = load_file(path)
    theirs = model.state_dict()
    tolerated = lambda k: k.endswith(".num_batches_tracked")  # noqa: E731
    missing = sorted(k for k in theirs if k not in ours and not tolerated(k))
    unexpected = sorted(k for k in ours if k not in theirs and not tolerated(k))
    shapes = sorted(
        f"{k}: file {list(ours[k].shape)}, model {list(theirs[k].shape)}"
        for k in ours
        if k in theirs and ours[k].shape != theirs[k].shape
    )
    if missing or unexpected or shapes:
        lines = [f"{path} does not fit the network of model.json:"]
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if keys:
                lines.append(f"  {len(keys)} {what}: " + ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else ""))
        sys.exit("\n".join(lines))
    state = {k: v.to(theirs[k].dtype) for k, v in ours.items() if k in theirs}
    # strict=False only for num_batches_tracked, which was checked above.
    result = model.load_state_dict(state, strict=False)
    left = [k for k in result.missing_keys if not tolerated(k)]
    if left or result.unexpected_keys:
        sys.exit(f"load_state_dict: missing {left}, unexpected {result.unexpected_keys}")
    print(f"loaded {len(state)} tensors from {path} (names and shapes match)", file=sys.stderr)


class OnnxDetector(nn.Module):
    """The exported graph: grey image (and template) in, detections of that image out."""

    def __init__(self, model, input_mode):
        super().__init__()
        self.model = model
        self.input_mode = input_mode

    def forward(self, image, template=None):
        # [1, 1, H, W] -> [1, H, W]; `pcb_vision::compose` on single-channel inputs.
        i = image[0]
        if self.input_mode == "image_template_diff":
            t = template[0]
            x = torch.cat([i, t, (i - t).abs()], 0)
        else:
            x = torch.cat([i, i, i], 0)
        det = self.model([x])[0]
        return det["boxes"], det["labels"], det["scores"]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export(det, cfg, out, height, width, weights_path):
    import onnx

    two = cfg["input"] == "image_template_diff"
    # The tracer follows one example; a mid-grey board with a brighter square makes the
    # example yield proposals, so no data-dependent branch is traced as empty.
    img = torch.full((1, 1, height, width), 0.5)
    img[..., height // 4 : height // 2, width // 4 : width // 2] = 1.0
    tpl = torch.full((1, 1, height, width), 0.5)
    args = (img, tpl) if two else (img,)
    inputs = ["image", "template"] if two else ["image"]
    dynamic = {n: {2: "height", 3: "width"} for n in inputs}
    dynamic.update({"boxes": {0: "detections"}, "labels": {0: "detections"}, "scores": {0: "detections"}})
    with warnings.catch_warnings():
        # The tracer warns about every Python-side shape computation torchvision does;
        # torchvision's detection models are written to export despite them.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            det,
            args,
            out,
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=["boxes", "labels", "scores"],
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    m = onnx.load(out)
    onnx.checker.check_model(m)
    meta = {
        "pcb.model_config": json.dumps(cfg, sort_keys=True),
        "pcb.weights_sha256": sha256(weights_path),
        "pcb.inputs": "image, template: [1,1,H,W] float32 grey in [0,1]" if two else "image: [1,1,H,W] float32 grey in [0,1]",
        "pcb.outputs": "boxes [N,4] x1 y1 x2 y2 pixels, labels [N] int64, scores [N] float32",
    }
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    m.doc_string = "PCB defect detector (Faster R-CNN), exported by pipelines/export/onnx_export.py"
    onnx.save(m, out)
    print(f"wrote {out}: {os.path.getsize(out)} bytes, opset {OPSET}, inputs {inputs}", file=sys.stderr)


def read_grey(path):
    """[1, 1, H, W] float32 in [0, 1], as `pcb_vision::data::load_grey` (luma of 8 bits / 255)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(a)[None, None]


def match(a, b, iou_min=0.5):
    """Greedy one-to-one pairing of two detection sets (same label, best IoU first);
    returns the pairs and the unpaired indices of each side."""
    from torchvision.ops import box_iou

    if len(a[0]) == 0 or len(b[0]) == 0:
        return [], list(range(len(a[0]))), list(range(len(b[0])))
    iou = box_iou(a[0], b[0])
    iou[a[1][:, None] != b[1][None, :]] = -1
    pairs, used_a, used_b = [], set(), set()
    for flat in torch.argsort(iou.flatten(), descending=True).tolist():
        i, j = divmod(flat, iou.shape[1])
        if iou[i, j] < iou_min:
            break
        if i in used_a or j in used_b:
            continue
        pairs.append((i, j))
        used_a.add(i)
        used_b.add(j)
    return pairs, [i for i in range(len(a[0])) if i not in used_a], [j for j in range(len(b[0])) if j not in used_b]


def check(det, cfg, out, board, template):
    """Runs torch and onnxruntime on the board (whole, and a crop of another size to
    exercise the dynamic axes) and prints the largest differences."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    img, tpl = read_grey(board), read_grey(template) if template else None
    if cfg["input"] == "image_template_diff" and tpl is None:
        sys.exit("--check: this model needs the board's template (--template)")
    h, w = img.shape[-2:]
    for name, sl in (("whole", (slice(None), slice(None))), ("crop", (slice(0, h - h // 4 - 3), slice(w // 8, w)))):
        args = [img[..., sl[0], sl[1]].contiguous()]
        if cfg["input"] == "image_template_diff":
            args.append(tpl[..., sl[0], sl[1]].contiguous())
        with torch.no_grad():
            ref = det(*args)
        feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
        got = [torch.from_numpy(np.asarray(x)) for x in sess.run(None, feed)]
        pairs, only_t, only_o = match(ref, got)
        db = max((float((ref[0][i] - got[0][j]).abs().max()) for i, j in pairs), default=0.0)
        ds = max((float((ref[2][i] - got[2][j]).abs()) for i, j in pairs), default=0.0)
        lost = [f"{float(ref[2][i]):.3f}" for i in only_t] + [f"{float(got[2][j]):.3f}" for j in only_o]
        print(
            f"check {name} {tuple(args[0].shape[-2:])}: torch {len(ref[2])} detections, onnxruntime {len(got[2])}, "
            f"{len(pairs)} paired; max |box diff| {db:.2e} px, max |score diff| {ds:.2e}"
            + (f"; unpaired scores {lost}" if lost else "")
        )
        # Unpaired detections can only be borderline ones (score at the 0.05 cut or a
        # near-tie in NMS); a confident one is an export error.
        if any(float(s) >= 0.1 for s in lost):
            sys.exit("check failed: a confident detection is missing on one side")


def default_board():
    # The demo's first DeepPCB board, from the shared dataset (the project only names it).
    root = os.path.join(REPO, "..", "shared", "datasets", "deeppcb")
    with open(os.path.join(REPO, "pipelines", "demo", "deeppcb-sample.txt")) as f:
        stem = f.readline().split()[0][: -len(".jpg")]
    return os.path.join(root, stem + "_test.jpg"), os.path.join(root, stem + "_temp.jpg")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="model.safetensors (torchvision key names)")
    ap.add_argument("--config", help="model.json (default: beside the weights)")
    ap.add_argument("--out", required=True, help="the .onnx file to write")
    ap.add_argument("--height", type=int, default=640, help="height of the tracing example")
    ap.add_argument("--width", type=int, default=640, help="width of the tracing example")
    ap.add_argument("--check", action="store_true", help="compare onnxruntime with torch on a real board")
    ap.add_argument("--board", help="--check's board image (default: the first board of pipelines/demo/deeppcb-sample.txt in ../shared/datasets/deeppcb)")
    ap.add_argument("--template", help="--check's template (default: the board's *_temp.jpg)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.config or os.path.join(os.path.dirname(os.path.abspath(args.weights)), "model.json"))
    model = build(cfg)
    load_weights(model, args.weights)
    det = OnnxDetector(model, cfg["input"]).eval()
    if os.path.dirname(os.path.abspath(args.out)):
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    export(det, cfg, args.out, args.height, args.width, args.weights)
    if args.check:
        board, template = default_board()
        if args.board:
            board = args.board
            template = args.template or (board[: -len("_test.jpg")] + "_temp.jpg" if board.endswith("_test.jpg") else None)
        elif args.template:
            template = args.template
        check(det, cfg, args.out, board, template if cfg["input"] == "image_template_diff" else None)


if __name__ == "__main__":
    main()
