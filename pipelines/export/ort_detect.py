"""Runs an exported detector (pipelines/export/onnx_export.py) in ONNX Runtime on boards
and prints the detections as JSON; the small consumer side of the export, with nothing
but onnxruntime and numpy (deploy/requirements-test.txt), used by the parity test
pipelines/pcb/tests/onnx_parity.rs.

    python ort_detect.py model.onnx --board a_test.pgm a_temp.pgm --board b_test.pgm b_temp.pgm
    python ort_detect.py model.onnx --board a_test.jpg a_temp.jpg     # JPEG/PNG need Pillow
    python ort_detect.py model.onnx --board ... --weights model.safetensors

Images are read as 8-bit grey and divided by 255 (as pcb_vision::data::load_grey does).
Binary PGM (P5) and .npy are read with numpy alone, so a caller can hand over pixels it
decoded itself and both sides see the same input; anything else goes through Pillow.
`--weights` adds the file's sha256 beside the one the export recorded in the model's
metadata (`pcb.weights_sha256`), to tell a stale model.onnx from a wrong one.

Output (stdout): {"model": {metadata}, "inputs": [...], "weights_sha256": ...,
"boards": [{"image": path, "boxes": [[x1, y1, x2, y2], ...], "labels": [...],
"scores": [...]}, ...]}.
"""

import argparse
import hashlib
import json
import sys

import numpy as np
import onnxruntime as ort


def read_pgm(path):
    """A binary PGM (P5, maxval < 256) as a uint8 [H, W] array."""
    with open(path, "rb") as f:
        data = f.read()
    fields, pos = [], 0
    # Header: magic, width, height, maxval, separated by whitespace, '#' comments allowed,
    # then exactly one whitespace byte before the pixels.
    while len(fields) < 4:
        while data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end : end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    if fields[0] != b"P5" or int(fields[3]) > 255:
        sys.exit(f"{path}: not an 8-bit binary PGM (P5)")
    w, h = int(fields[1]), int(fields[2])
    pixels = np.frombuffer(data, dtype=np.uint8, count=w * h, offset=pos + 1)
    return pixels.reshape(h, w)


def read_grey(path):
    """[1, 1, H, W] float32 in [0, 1]."""
    if path.endswith(".pgm"):
        a = read_pgm(path)
    elif path.endswith(".npy"):
        a = np.load(path)
    else:
        try:
            from PIL import Image
        except ImportError:
            sys.exit(f"{path}: only .pgm and .npy are read without Pillow (pip install pillow)")
        a = np.asarray(Image.open(path).convert("L"))
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / np.float32(255.0)
    if a.ndim != 2:
        sys.exit(f"{path}: expected a grey image, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)[None, None]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="the exported .onnx")
    ap.add_argument(
        "--board", nargs="+", action="append", required=True, metavar="IMAGE [TEMPLATE]",
        help="a board image and, for image_template_diff models, its template (repeatable)",
    )
    ap.add_argument("--weights", help="report this file's sha256 beside the model's pcb.weights_sha256")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    args = ap.parse_args()
    so = ort.SessionOptions()
    if args.threads > 0:
        so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = {
        "model": dict(sess.get_modelmeta().custom_metadata_map),
        "inputs": names,
        "onnxruntime": ort.__version__,
        "boards": [],
    }
    if args.weights:
        with open(args.weights, "rb") as f:
            out["weights_sha256"] = hashlib.sha256(f.read()).hexdigest()
    for paths in args.board:
        if len(paths) != len(names):
            sys.exit(f"the model takes {names}, but --board gave {paths}")
        feed = {n: read_grey(p) for n, p in zip(names, paths)}
        shapes = {tuple(a.shape[-2:]) for a in feed.values()}
        if len(shapes) > 1:
            # As pcb_vision::compose: the template must be the board's size.
            sys.exit(f"{paths}: image and template differ in size ({sorted(shapes)})")
        boxes, labels, scores = sess.run(["boxes", "labels", "scores"], feed)
        out["boards"].append(
            {
                "image": paths[0],
                "boxes": boxes.astype(float).tolist(),
                "labels": labels.astype(int).tolist(),
                "scores": scores.astype(float).tolist(),
            }
        )
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
