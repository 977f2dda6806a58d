#!/usr/bin/env bash
# Does the review queue pick the boards worth correcting? On DeepPCB (issue 17): a model
# trained on one half of trainval.txt (or START of its boards) ranks the other half as the
# viewer's queue does; "correcting" a board means training on its true labels. From the same
# weights, the model is fine-tuned on its own boards plus, in turn:
#   - the 100 boards the queue ranks first (corrected),
#   - 100 random boards of the other half (corrected),
#   - 100 of its own boards again (the control: as many steps, nothing new),
# once per seed in SEEDS (the fine-tuning's seed and the random draw), and every model is
# evaluated on val.txt. Prints one table with each seed and the queue's gain over random,
# seed by seed. Resumable: each step is skipped when its output exists under WORK.
#
#   tests/recipe/queue-experiment.sh          # release build, defaults below (about an hour on 2 cores)
#   WORK=/tmp/q SEEDS="1 2 3" RANK=oracle tests/recipe/queue-experiment.sh
#   EPOCHS=6 A_STEP=6 TUNE_LR=1e-3 TUNE_EPOCHS=2 SEEDS="1 2 3" ...    # the first protocol
#   NEGATIVES=1 WORK=/tmp/qn ...      # corrections delete model A's false boxes too
#   NEGATIVES=1 CONTROL=0 SEEDS="6 7 8 9 10" ...   # more seeds, without the control arm
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
cd "$ROOT"
DATA=${DATA:-../shared/datasets/deeppcb}
WORK=${WORK:-$HOME/.cache/pcb-queue-experiment}
BIN=${BIN:-target/release/pcb}
# The seed of the first model, and the seeds of the fine-tuning runs and random draws.
SEED=${SEED:-1}
SEEDS=${SEEDS:-1 2 3 4 5}
# Model A is trained to convergence (its loss flat, the learning rate dropped tenfold after
# A_STEP epochs), so that the fine-tuning measures the new boards, not more training: a
# shorter schedule (EPOCHS=6 A_STEP=6 TUNE_LR=1e-3 TUNE_EPOCHS=2, the first protocol) gains
# as much from repeating its own boards as from new ones.
EPOCHS=${EPOCHS:-24}
A_STEP=${A_STEP:-18}
# The learning rates: model A's, and the fine-tuning's (gentle: from a converged model).
LR=${LR:-1e-3}
TUNE_LR=${TUNE_LR:-1e-4}
TUNE_EPOCHS=${TUNE_EPOCHS:-3}
# The fine-tuning's learning rate drops tenfold after this many epochs (its default, the
# last epoch, keeps it constant).
TUNE_STEP=${TUNE_STEP:-$TUNE_EPOCHS}
PICK=${PICK:-100}
# How many boards of half A model A is trained on (a divisor of 500): with all 500, 100 more
# are a fifth more data; with 100, they double it.
START=${START:-500}
THRESHOLD=${THRESHOLD:-0.5}
# The detector's report_threshold: the viewer sees only boxes scoring at least this.
REPORT=${REPORT:-0.3}
# How the queue ranks:
#   stratified (the viewer's queue): each board's boxes' uncertainty summed (a box scoring s
#     counts 1 - |2s - 1|: 1 at 0.5, 0 at 0 or 1); boards ranked within their line, and the
#     lines interleaved by that rank's share of the line, so the top of the queue holds each
#     line in proportion to its waiting boards, its most uncertain ones first;
#   verdict: the best score's distance from the threshold, nearest first (stop 22's queue);
#   boxes: how many boxes score within 0.2 of the threshold, most first;
#   oracle: for analysis only, not a queue (it reads the labels a queue never has): the
#     boards on which model A makes the most mistakes at the threshold first (boxes that
#     match no label of their class at IoU 0.5, and labels no box matches).
RANK=${RANK:-stratified}
# What a correction gives the next model: 0, the board's true labels (the boxes the model
# missed drawn, its false ones gone); 1, those labels plus each false box model A reported
# (from REPORT up, matching no label of its class at IoU 0.5) as a hard negative, as an
# operator's deletion (`pcb train --negatives`), for the picked boards of every arm but the
# control (whose boards model A was trained on).
NEGATIVES=${NEGATIVES:-0}
# 0 skips the control arm (a third less time, for a check on more seeds).
CONTROL=${CONTROL:-1}
# The compact recipe's network (README, "The compact model"), on a shorter schedule.
NET="--backbone r18 --backbone-width 16 --fpn-channels 64 --representation-size 256 \
--test-proposals 300 --norm batch --min-size 0"
TRAIN="--crop 320 --batch-size 4 --box-batch-size 128 --warmup-steps 100 --clip-grad-norm 10 \
--spike-factor 1.5"

[ $((500 % START)) -eq 0 ] || { echo "START=$START does not divide 500" >&2; exit 2; }
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release -p pcb first" >&2; exit 2; }
[ -f "$DATA/trainval.txt" ] || { echo "no dataset at $DATA (see README, Data)" >&2; exit 2; }
mkdir -p "$WORK"
DATA_ABS="$(cd "$DATA" && pwd -P)"

# The halves: every other board of trainval.txt, so both halves span every group.
awk 'NR % 2 == 1' "$DATA_ABS/trainval.txt" >"$WORK/half-a.txt"
# Model A's boards: START of half A's 500, evenly spaced (every 500/START-th), so a small
# start still spans every group.
awk -v k=$((500 / START)) '(NR - 1) % k == 0' "$WORK/half-a.txt" | head -n "$START" >"$WORK/start.txt"
awk 'NR % 2 == 0' "$DATA_ABS/trainval.txt" >"$WORK/half-b.txt"

train() { # out list epochs [weights [seed [lr step epochs [lr [negatives file]]]]]
    local out=$1 list=$2 epochs=$3 weights=${4:-} seed=${5:-$SEED} step=${6:-$3} lr=${7:-$LR} neg=${8:-}
    [ -f "$out/model.safetensors" ] && [ -f "$out/done" ] && return 0
    mkdir -p "$out"
    echo "== training $out on $(wc -l <"$list") boards, $epochs epochs ($(date -u +%FT%TZ))"
    "$BIN" train --data "$DATA_ABS" --list "$list" $NET $TRAIN --seed "$seed" \
        --epochs "$epochs" --lr-step-epochs "$step" --lr "$lr" \
        ${weights:+--weights "$weights"} ${neg:+--negatives "$neg"} --out "$out" 2>&1 | tail -5 | tee "$out/train.tail"
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

train "$WORK/a" "$WORK/start.txt" "$EPOCHS" "" "$SEED" "$A_STEP"
evaluate "$WORK/a/model.safetensors" "$DATA_ABS/val.txt" "$WORK/a/val.json"
evaluate "$WORK/a/model.safetensors" "$WORK/half-b.txt" "$WORK/a/half-b.json" "$WORK/a/half-b.jsonl"

# The queue's order over half B (from model A's answers, the same for every seed).
python3 - "$WORK" "$PICK" "$THRESHOLD" "$RANK" "$REPORT" <<'PY'
import collections, json, sys
work, pick, t, rank, report = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], float(sys.argv[5])
lines = [l for l in open(f"{work}/half-b.txt") if l.strip()]
by_image = {l.split()[0]: l for l in lines}
rows = [json.loads(row) for row in open(f"{work}/a/half-b.jsonl")]
for r in rows:
    r["detections"] = [d for d in r["detections"] if d["score"] >= report]
def iou(a, b):
    w = min(a["x2"], b["x2"]) - max(a["x1"], b["x1"])
    h = min(a["y2"], b["y2"]) - max(a["y1"], b["y1"])
    inter = max(0, w) * max(0, h)
    union = ((a["x2"] - a["x1"]) * (a["y2"] - a["y1"])
             + (b["x2"] - b["x1"]) * (b["y2"] - b["y1"]) - inter)
    return inter / union if union > 0 else 0
# What an operator deletes on each board (NEGATIVES=1): a reported box that is none of the
# board's defects (no label of its class at IoU 0.5).
with open(f"{work}/false-boxes.txt", "w") as out:
    for r in rows:
        for d in r["detections"]:
            if not any(g["class_id"] == d["class_id"] and iou(d, g) >= 0.5 for g in r["ground_truth"]):
                out.write(f"{r['image']} {d['x1']:.1f} {d['y1']:.1f} {d['x2']:.1f} {d['y2']:.1f}\n")
def uncertainty(r):
    return sum(1 - abs(2 * d["score"] - 1) for d in r["detections"])
key = {}
if rank == "stratified":
    # DeepPCB's groups stand for the lines (the group is the board design).
    by_line = collections.defaultdict(list)
    for r in rows:
        by_line[r["image"].split("/")[0]].append(r)
    for members in by_line.values():
        members.sort(key=lambda r: -uncertainty(r))
        for k, r in enumerate(members):
            key[r["image"]] = ((k + 0.5) / len(members), -uncertainty(r))
for r in rows:
    scores = [d["score"] for d in r["detections"]]
    if rank == "verdict":
        # Nearest the threshold first; a board without a box comes last.
        key[r["image"]] = (abs(max(scores) - t) if scores else float("inf"),)
    elif rank == "boxes":
        key[r["image"]] = (-sum(1 for s in scores if abs(s - t) < 0.2),)
    elif rank == "oracle":
        boxes = sorted((d for d in r["detections"] if d["score"] >= t), key=lambda d: -d["score"])
        used, hits = set(), 0
        for d in boxes:
            match = max(((iou(d, g), j) for j, g in enumerate(r["ground_truth"])
                         if j not in used and g["class_id"] == d["class_id"]), default=(0, None))
            if match[0] >= 0.5:
                used.add(match[1])
                hits += 1
        key[r["image"]] = (-(len(boxes) - hits + len(r["ground_truth"]) - hits),)
ranked = sorted(key, key=lambda i: key[i])
open(f"{work}/queue-{rank}.txt", "w").write("".join(by_image[i] for i in ranked[:pick]))
groups = collections.Counter(i.split("/")[0] for i in ranked[:pick])
print(f"queue ({rank}): the top {pick} by group: " + ", ".join(f"{g} {n}" for g, n in sorted(groups.items())))
PY

for s in $SEEDS; do
    python3 - "$WORK" "$PICK" "$s" "$RANK" <<'PY'
import random, sys
work, pick, seed, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
a = open(f"{work}/start.txt").read()
b = [l for l in open(f"{work}/half-b.txt") if l.strip()]
rng = random.Random(seed)
open(f"{work}/list-random-s{seed}.txt", "w").write(a + "".join(rng.sample(b, pick)))
# The control repeats boards the model has already seen: as many steps, nothing new.
a_lines = [l for l in a.splitlines(keepends=True) if l.strip()]
open(f"{work}/list-control-s{seed}.txt", "w").write(a + "".join(rng.sample(a_lines, pick)))
open(f"{work}/list-queue-{rank}-s{seed}.txt", "w").write(a + open(f"{work}/queue-{rank}.txt").read())
PY
    if [ "$NEGATIVES" = 1 ]; then
        for arm in "queue-$RANK" random; do
            # The false boxes of the picked boards (the list's last PICK lines).
            awk 'NR == FNR { picked[$1] = 1; next } $1 in picked' \
                <(tail -n "$PICK" "$WORK/list-$arm-s$s.txt") "$WORK/false-boxes.txt" \
                >"$WORK/negatives-$arm-s$s.txt"
            echo "seed $s, $arm: $(wc -l <"$WORK/negatives-$arm-s$s.txt") false boxes deleted on its $PICK boards"
        done
    fi
    arms="queue-$RANK random"
    [ "$CONTROL" = 1 ] && arms="$arms control"
    for arm in $arms; do
        neg=""
        [ "$NEGATIVES" = 1 ] && [ "$arm" != control ] && neg="$WORK/negatives-$arm-s$s.txt"
        train "$WORK/$arm-s$s" "$WORK/list-$arm-s$s.txt" "$TUNE_EPOCHS" "$WORK/a/model.safetensors" "$s" "$TUNE_STEP" "$TUNE_LR" "$neg"
        evaluate "$WORK/$arm-s$s/model.safetensors" "$DATA_ABS/val.txt" "$WORK/$arm-s$s/val.json"
    done
done

python3 - "$WORK" "$PICK" "$RANK" "$SEEDS" "$CONTROL" <<'PY'
import json, statistics, sys
work, pick, rank, seeds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split()
control = sys.argv[5] == "1"
def val(d):
    return 100 * json.load(open(f"{work}/{d}/val.json"))["map_deeppcb"]
start = sum(1 for l in open(f"{work}/start.txt") if l.strip())
print(f"model A, trained on {start} boards of half A: val mAP {val('a'):.2f}%")
arms = [(f"queue-{rank}", f"+ the top {pick} by the {rank} rule, corrected"),
        ("random", f"+ {pick} random boards, corrected")]
if control:
    arms.append(("control", f"+ {pick} of its boards again (control)"))
print(f"| fine-tuned from A on its {start} boards | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
print("| --- |" + " --- |" * (len(seeds) + 1))
got = {}
for arm, name in arms:
    got[arm] = [val(f"{arm}-s{s}") for s in seeds]
    print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in got[arm]) + f" | {statistics.mean(got[arm]):.2f} |")
gain = [q - r for q, r in zip(got[f"queue-{rank}"], got["random"])]
print(f"| queue − random, points | " + " | ".join(f"{g:+.2f}" for g in gain) + f" | {statistics.mean(gain):+.2f} |")
if len(gain) > 1:
    # The paired differences' spread: a gain is told apart from noise only when it is
    # several standard errors from 0.
    se = statistics.stdev(gain) / len(gain) ** 0.5
    ahead = sum(1 for g in gain if g > 0)
    print(f"queue − random over {len(gain)} seeds: {statistics.mean(gain):+.2f} ± {se:.2f} points "
          f"(mean ± standard error), queue ahead on {ahead} of {len(gain)}")
PY
