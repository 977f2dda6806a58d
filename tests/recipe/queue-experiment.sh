#!/usr/bin/env bash
# Does the review queue pick the boards worth correcting? On DeepPCB (issue 17): a model
# trained on one half of trainval.txt ranks the other half as the viewer's queue does (the
# best score's distance from the verdict threshold, nearest first); "correcting" a board
# means training on its true labels. The 100 top-ranked boards and 100 random ones are each
# added to the first half, the model is fine-tuned from the same weights on each, and all
# three are evaluated on val.txt. Prints one table. Resumable: each step is skipped when its
# output exists under WORK.
#
#   tests/recipe/queue-experiment.sh                      # debug build, defaults below
#   WORK=/tmp/q BIN=target/release/pcb EPOCHS=6 TUNE_EPOCHS=2 SEED=1 tests/recipe/queue-experiment.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
cd "$ROOT"
DATA=${DATA:-../shared/datasets/deeppcb}
WORK=${WORK:-$HOME/.cache/pcb-queue-experiment}
BIN=${BIN:-target/debug/pcb}
SEED=${SEED:-1}
EPOCHS=${EPOCHS:-6}
TUNE_EPOCHS=${TUNE_EPOCHS:-2}
PICK=${PICK:-100}
THRESHOLD=${THRESHOLD:-0.5}
# How the queue ranks: `verdict` (the best score's distance from the threshold, nearest
# first) or `boxes` (how many boxes score within 0.2 of it, most first: uncertainty per box).
RANK=${RANK:-verdict}
# The compact recipe's network (README, "The compact model"), on a shorter schedule.
NET="--backbone r18 --backbone-width 16 --fpn-channels 64 --representation-size 256 \
--test-proposals 300 --norm batch --min-size 0"
TRAIN="--crop 320 --batch-size 4 --box-batch-size 128 --warmup-steps 100 --clip-grad-norm 10 \
--spike-factor 1.5"

[ -x "$BIN" ] || { echo "no $BIN: cargo build -p pcb first" >&2; exit 2; }
[ -f "$DATA/trainval.txt" ] || { echo "no dataset at $DATA (see README, Data)" >&2; exit 2; }
mkdir -p "$WORK"
DATA_ABS="$(cd "$DATA" && pwd -P)"

# The halves: every other board of trainval.txt, so both halves span every group.
awk 'NR % 2 == 1' "$DATA_ABS/trainval.txt" >"$WORK/half-a.txt"
awk 'NR % 2 == 0' "$DATA_ABS/trainval.txt" >"$WORK/half-b.txt"

train() { # out list epochs [weights]
    local out=$1 list=$2 epochs=$3 weights=${4:-}
    [ -f "$out/model.safetensors" ] && [ -f "$out/done" ] && return 0
    mkdir -p "$out"
    echo "== training $out on $(wc -l <"$list") boards, $epochs epochs ($(date -u +%FT%TZ))"
    "$BIN" train --data "$DATA_ABS" --list "$list" $NET $TRAIN --seed "$SEED" \
        --epochs "$epochs" --lr-step-epochs "$epochs" --lr "${LR:-1e-3}" \
        ${weights:+--weights "$weights"} --out "$out" 2>&1 | tail -4 | tee "$out/train.tail"
    touch "$out/done"
}

evaluate() { # weights list report [per-image]
    local weights=$1 list=$2 report=$3 per=${4:-}
    [ -f "$report" ] && return 0
    "$BIN" eval --data "$DATA_ABS" --list "$list" --bf16 off --weights "$weights" \
        --report "$report.tmp" --plot "${report%.json}.png" ${per:+--per-image "$per"} \
        >"${report%.json}.log" 2>&1
    mv "$report.tmp" "$report"
}

train "$WORK/a" "$WORK/half-a.txt" "$EPOCHS"
evaluate "$WORK/a/model.safetensors" "$DATA_ABS/val.txt" "$WORK/a/val.json"
evaluate "$WORK/a/model.safetensors" "$WORK/half-b.txt" "$WORK/a/half-b.json" "$WORK/a/half-b.jsonl"

# The queue's order over half B, and a random draw of the same size.
python3 - "$WORK" "$PICK" "$THRESHOLD" "$SEED" "$RANK" <<'PY'
import json, random, sys
work, pick, t, seed, rank = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
lines = [l for l in open(f"{work}/half-b.txt") if l.strip()]
by_image = {l.split()[0]: l for l in lines}
ranked = []
for row in open(f"{work}/a/half-b.jsonl"):
    r = json.loads(row)
    scores = [d["score"] for d in r["detections"]]
    top = max(scores) if scores else None
    # The viewer's queue: nearest the threshold first; a board without a box has no best
    # score and comes last (the queue leaves it out).
    gap = abs(top - t) if top is not None else float("inf")
    if rank == "boxes":
        # Most uncertain boxes first; the key stays "smaller first".
        gap = -sum(1 for s in scores if abs(s - t) < 0.2)
    ranked.append((gap, r["image"]))
ranked.sort()
top = [by_image[i] for _, i in ranked[:pick]]
rng = random.Random(seed)
rand = rng.sample(lines, pick)
a = open(f"{work}/half-a.txt").read()
open(f"{work}/a-plus-queue-{rank}.txt", "w").write(a + "".join(top))
open(f"{work}/a-plus-random.txt", "w").write(a + "".join(rand))
gaps = [g for g, _ in ranked[:pick]]
what = (f"best scores lie within {max(gaps):.3f} of {t}" if rank == "verdict"
        else f"boards hold {-max(gaps)} to {-min(gaps)} boxes each within 0.2 of {t}")
print(f"queue ({rank}): of the {pick} top-ranked boards, the {what}; "
      f"{sum(1 for g, _ in ranked if g == float('inf'))} of {len(ranked)} boards had no box; "
      f"{len(set(top) & set(rand))} boards are in both picks")
PY

train "$WORK/queue-$RANK" "$WORK/a-plus-queue-$RANK.txt" "$TUNE_EPOCHS" "$WORK/a/model.safetensors"
train "$WORK/random" "$WORK/a-plus-random.txt" "$TUNE_EPOCHS" "$WORK/a/model.safetensors"
evaluate "$WORK/queue-$RANK/model.safetensors" "$DATA_ABS/val.txt" "$WORK/queue-$RANK/val.json"
evaluate "$WORK/random/model.safetensors" "$DATA_ABS/val.txt" "$WORK/random/val.json"

python3 - "$WORK" "$PICK" <<'PY'
import json, os, sys
work, pick = sys.argv[1], sys.argv[2]
rows = [("trained on half A (500 boards)", "a")]
for rank, how in [("verdict", "best score nearest the threshold"), ("boxes", "most boxes near the threshold")]:
    if os.path.exists(f"{work}/queue-{rank}/val.json"):
        rows.append((f"+ {pick} boards the queue ranked first ({how}), corrected", f"queue-{rank}"))
rows.append((f"+ {pick} random boards, corrected", "random"))
print("| model | val mAP % | pooled AP % | F % |")
print("| --- | --- | --- | --- |")
for name, d in rows:
    r = json.load(open(f"{work}/{d}/val.json"))
    o, b = r.get("official_all") or {}, r.get("official_at_best") or {}
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"
    print(f"| {name} | {pct(r.get('map_deeppcb'))} | {pct(o.get('ap'))} | {pct(b.get('f_score'))} |")
PY
