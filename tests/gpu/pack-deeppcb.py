"""Packs DeepPCB for a GPU machine whose transfer limit (64 MiB) is below the dataset's
size: the training boards as 1-bit PNG (re-binarised at 128; deeppcb-r50.sh turns them back
into JPEG there), the val boards as their original JPEGs, annotations and lists unchanged.

    python tests/gpu/pack-deeppcb.py [SRC] [DST]   # needs Pillow (e.g. .venv-bench)

SRC defaults to ../shared/datasets/deeppcb, DST to .gpu/data (ignored by git: never commit
the dataset)."""
import os
import shutil
import sys

from PIL import Image


def main() -> None:
    src = sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets/deeppcb"
    dst = sys.argv[2] if len(sys.argv) > 2 else ".gpu/data"
    if not os.path.isdir(src):
        sys.exit(f"dataset folder {src} not found (DeepPCB layout expected)")
    for lst, original in [("trainval.txt", False), ("val.txt", True)]:
        os.makedirs(dst, exist_ok=True)
        shutil.copy(os.path.join(src, lst), os.path.join(dst, lst))
        with open(os.path.join(src, lst)) as f:
            entries = [line.split() for line in f if line.strip()]
        for img, ann in entries:
            for rel in (img, ann):
                os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy(os.path.join(src, ann), os.path.join(dst, ann))
            stem = img[: -len(".jpg")]
            for part in ("_test", "_temp"):
                path = os.path.join(src, stem + part + ".jpg")
                if original:
                    shutil.copy(path, os.path.join(dst, stem + part + ".jpg"))
                else:
                    grey = Image.open(path).convert("L")
                    binary = grey.point(lambda v: 255 if v >= 128 else 0).convert("1")
                    binary.save(os.path.join(dst, stem + part + ".png"), optimize=True)
        print(f"{lst}: {len(entries)} boards {'as they are' if original else 'as 1-bit PNG'}")


if __name__ == "__main__":
    main()
