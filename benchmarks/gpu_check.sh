#!/usr/bin/env bash
# gpu_check.sh: the prepared one-GPU check of BRPG's cost, one table at the end.
#
# What it runs (each stage in its own process, its output in <out>/<stage>.log):
#   env             device (torch.cuda.get_device_name or cpu), torch version, git commit
#   prototype_step  benchmarks/prototype_step.py, VOC (C=21) and COCO (C=81) scale, official sizes (4+4 images,
#                   513 crop, 30000-row queues): old vs new prototype step, initial clustering, R101 model step
#   clustering      benchmarks/clustering.py --device cuda, VOC and COCO scale: batched_kmeans new vs old
#   train_step_bf16 benchmarks/train_step.py, mean teacher vs BRPG (prototype phase), DeepLabV3+ ResNet-101,
#                   crop 513, batch 4+4, official head (256 channels, ASPP 12/24/36, 256-d rep), bf16 autocast
#   train_step_fp16 the same with fp16 autocast + GradScaler (the trainer's own trainer.amp path)
#   train_200       200 iterations of the demo config on CUDA (warm-up, sampling epoch, prototype init and
#                   prototype phase: trainer.iters_per_epoch=40) with the views' feature sampling on
#                   (trainer.view_every=10 and a listener on on_features_sampled, as a live dashboard has)
# How long: estimated 4-6 min on one H200 (not yet measured on a GPU), bounded to 8 min: the per-stage limits
# below sum to 480 s and a stage that runs past its limit fails the check (GPU_CHECK_LIMITS="30 110 90 95 95 60"
# overrides them). --dry-run: CPU, tiny sizes, about 1m45s on 2 shared cores; tests/test_gpu_check.py runs it.
# How to run (repository root, venv active or in .venv):
#   bash benchmarks/gpu_check.sh runs/gpu_check          # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gc  # anywhere, CPU
# Output: the logs, <stage>.json where a benchmark writes one, and the table, printed and in <out>/gpu_check.md;
# the table goes into README.md's benchmark section, "Cost of the method (benchmarks)" (edit nbs/index.ipynb).
# A failing stage stops the script with a non-zero exit naming the stage and its log: no partial table is written.
set -euo pipefail

usage="usage: bash benchmarks/gpu_check.sh [--dry-run] [--out DIR | DIR]   (default DIR: runs/gpu_check)"
die() { echo "gpu_check: $*" >&2; exit 2; }

DRY=0; OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory; $usage"; OUT="$2"; shift ;;
        --out=*) OUT="${1#--out=}" ;;
        -h|--help) echo "$usage"; exit 0 ;;
        -*) die "unknown option '$1'; $usage" ;;
        *) [ -z "$OUT" ] || die "more than one output directory ('$OUT', '$1'); $usage"; OUT="$1" ;;
    esac
    shift
done
OUT="${OUT:-runs/gpu_check}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ]; then PY="$VIRTUAL_ENV/bin/python"
elif [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"
else PY=python; fi
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1

mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT/gpu_check.md" "$OUT/stage_times.tsv"
: > "$OUT/stage_times.tsv"

if [ "$DRY" = 1 ]; then
    DEV=cpu
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
    # the demo dataset of train_step / train_200: few images, few val images (fast to build and to validate)
    SMALL="data.demo_num_images=48 data.demo_num_val=4 data.demo_num_labeled=8"
    PROTO_ARGS=(--device cpu --scale both --repeats 2 --init-repeats 1 --queue-len 1000 --kmeans-iters 10
                --skip-memory --crop 65 --model-crop 33 --model-repeats 1 --model-warmup 0 --backbone resnet18)
    CLUST_ARGS=(--device cpu --scale both --queues 2 --sk-queues 1)
    TS_ARGS=(--device cpu --crop 33 --batch 2 --backbone resnet18 --repeats 1 --warmup 1
             --set method.grid_num=0 $SMALL)
    TRAIN_ARGS=(cpu 4 1 1 $SMALL trainer.log_every=1)   # device, iterations, iters_per_epoch, view_every, overrides
    LIMITS=(120 120 120 120 120 120 120)
else
    DEV=cuda
    SMALL="data.demo_num_images=48 data.demo_num_val=8 data.demo_num_labeled=8"
    PROTO_ARGS=(--device cuda --scale both --repeats 20 --init-repeats 2 --model-repeats 10 --model-warmup 2)
    CLUST_ARGS=(--device cuda --scale both --sk-queues 3)
    # the demo data (11 classes) at 528 px under the official VOC model and head
    TS_ARGS=(--device cuda --crop 513 --batch 4 --backbone resnet101 --repeats 10 --warmup 3
             --set model.decoder_channels=256 model.rep_dim=256 "model.aspp_dilations=[12,24,36]"
                   method.grid_num=0 method.queue_len=30000 $SMALL)
    TRAIN_ARGS=(cuda 200 40 10)
    LIMITS=(30 110 90 95 95 60)     # env, prototype_step, clustering, train_step x2, train_200: 480 s
fi
if [ -n "${GPU_CHECK_LIMITS:-}" ]; then read -r -a LIMITS <<< "$GPU_CHECK_LIMITS"; fi
[ "${#LIMITS[@]}" -ge 6 ] || die "GPU_CHECK_LIMITS needs 6 limits in seconds (env, prototype_step, clustering, train_step_bf16, train_step_fp16, train_200)"

stage() {   # stage NAME LIMIT_S CMD...: run CMD with its output in NAME.log; any failure ends the script
    local name="$1" limit="$2"; shift 2
    local log="$OUT/$name.log" t0 t1 rc=0
    echo "== $name (limit ${limit}s) -> $log"
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1 || rc=$?
    t1=$(date +%s.%N)
    if [ "$rc" -ne 0 ]; then
        local why="exit $rc"; { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && why="ran past its ${limit}s limit"
        echo "gpu_check: stage '$name' failed ($why); log: $log" >&2
        tail -n 15 "$log" | sed 's/^/    /' >&2
        exit 1
    fi
    local dt; dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\n' "$name" "$dt" >> "$OUT/stage_times.tsv"
    echo "   $name: ${dt}s"
}

T_ALL=$(date +%s.%N)
stage env "${LIMITS[0]}" "$PY" - "$DEV" "$OUT/env.json" <<'PY'
import json, subprocess, sys, torch
dev, out = sys.argv[1], sys.argv[2]
if dev == "cuda" and not torch.cuda.is_available(): sys.exit("no CUDA device (run with --dry-run for the CPU check)")
name = torch.cuda.get_device_name(0) if dev == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
try: commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError: commit = ""
try: dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip())
except OSError: dirty = False
env = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "commit": (commit or "unknown") + ("+dirty" if dirty else "")}
print(json.dumps(env)); json.dump(env, open(out, "w"))
PY
stage prototype_step "${LIMITS[1]}" "$PY" benchmarks/prototype_step.py "${PROTO_ARGS[@]}"
stage clustering "${LIMITS[2]}" "$PY" benchmarks/clustering.py "${CLUST_ARGS[@]}" --json "$OUT/clustering.json"
for amp in bf16 fp16; do
    i=3; [ "$amp" = fp16 ] && i=4
    stage "train_step_$amp" "${LIMITS[$i]}" "$PY" benchmarks/train_step.py --amp "$amp" --methods mean_teacher brpg \
        --json "$OUT/train_step_$amp.json" "${TS_ARGS[@]}"
done
stage train_200 "${LIMITS[5]}" "$PY" - "$OUT/train_200" "$OUT/train_200.json" "${TRAIN_ARGS[@]}" <<'PY'
import json, statistics, sys, time, torch
from brpg.config import load_config
from brpg.trainer import Trainer
run_dir, out, dev, iters, ipe, view_every, *extra = sys.argv[1:]

class ViewTap:
    "Stands in for the views' listener (a live TrainingDashboard): the trainer samples features for it."
    def __init__(self): self.samples, self.rows = 0, 0
    def on_features_sampled(self, trainer, sample): self.samples += 1; self.rows += len(sample["feats"])

cfg = load_config("demo", [f"trainer.device={dev}", f"trainer.max_iters={iters}", f"trainer.iters_per_epoch={ipe}",
                           f"trainer.view_every={view_every}", "trainer.progress=false", "trainer.tensorboard=false",
                           "data.num_workers=1", *extra])
tap = ViewTap()
tr = Trainer(cfg, callbacks=[tap], out_dir=run_dir, overwrite=True)
if tr.device.type == "cuda": torch.cuda.reset_peak_memory_stats(tr.device)
t0 = time.perf_counter()
try: summary = tr.fit()
finally: tr.close()
wall = time.perf_counter() - t0
recs = [r for r in tr.history if r.get("type") == "train"]
phases = sorted({r["phase"] for r in recs})
res = {"iterations": tr.iteration, "wall_s": wall, "it_per_s": tr.iteration / wall,
       "train_it_per_s": statistics.median(r["it_per_s"] for r in recs) if recs else float("nan"),
       "view_samples": tap.samples, "view_rows": tap.rows, "phases": phases, "device": str(tr.device),
       "peak_mem_mb": torch.cuda.max_memory_allocated(tr.device) / 2**20 if tr.device.type == "cuda" else None,
       "final_loss": recs[-1]["loss"] if recs else None}
print(json.dumps(res)); json.dump(res, open(out, "w"))
if tr.iteration != int(iters): sys.exit(f"trained {tr.iteration} iterations, expected {iters}")
if tap.samples == 0: sys.exit("the views' sampling never fired (no on_features_sampled event)")
if "prototypes" not in phases: sys.exit(f"the run never reached the prototype phase (phases {phases})")
PY
TOTAL=$(awk -v a="$T_ALL" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

# ---- the table (every number parsed from the stage logs / JSON; a missing number fails the script) ----
"$PY" - "$OUT" "$DRY" "$TOTAL" <<'PY'
import json, math, re, sys
from pathlib import Path
out, dry, total = Path(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3])
def fail(msg): sys.exit(f"gpu_check: table: {msg}")
def need(pat, text, what, flags=0):
    m = re.search(pat, text, flags)
    if not m: fail(f"no {what} in the log")
    return m
env = json.loads((out / "env.json").read_text())
times = dict(l.split("\t") for l in (out / "stage_times.tsv").read_text().splitlines() if l)
rows = []   # (stage, item, value, unit)

log = (out / "prototype_step.log").read_text()
for scale in ("VOC", "COCO"):
    sec = need(rf"== {scale} scale: C=\d+\n(.*?)(?=\n== |\Z)", log, f"{scale} section", re.S).group(1)
    P = need(r"(\d+) prototypes", sec, f"{scale} prototype count").group(1)
    old = float(need(r"^\s*old\s+\S+\s+\S+\s+\S+\s+(\S+)", sec, f"{scale} old step", re.M).group(1))
    new = float(need(r"^\s*new\s+\S+\s+\S+\s+\S+\s+(\S+)", sec, f"{scale} new step", re.M).group(1))
    init = float(need(r"initial clustering .*?median ([\d.]+) s", sec, f"{scale} init").group(1))
    mstep = need(r"model step \(.*?timm (\S+?),.*? at (\d+)\): median ([\d.]+) ms", sec, f"{scale} model step")
    mname, model = f"{mstep.group(1)} crop {mstep.group(2)}", float(mstep.group(3))
    ratio = float(need(r"ratio prototype step \(new\) / model step: ([\d.]+)", sec, f"{scale} ratio").group(1))
    rows += [("prototype_step", f"{scale} ({P} prototypes) step old", old, "ms"),
             ("prototype_step", f"{scale} step new", new, "ms"),
             ("prototype_step", f"{scale} step new/old", new / old, "x"),
             ("prototype_step", f"{scale} initial clustering (APO + k-means)", init, "s"),
             ("prototype_step", f"{scale} model step ({mname}, fwd+bwd)", model, "ms"),
             ("prototype_step", f"{scale} prototype step / model step", ratio, "x")]

for r in json.loads((out / "clustering.json").read_text()):
    s = r["scale"].upper()
    rows += [("clustering", f"{s} {r['queues']} old", r["old_s"], "s"),
             ("clustering", f"{s} new", r["new_s"], "s"),
             ("clustering", f"{s} new/old", r["ratio"], "x"),
             ("clustering", f"{s} inertia new / sklearn", r["inertia_new"], "x")]

for amp in ("bf16", "fp16"):
    by = {r["method"]: r for r in json.loads((out / f"train_step_{amp}.json").read_text())}
    mt, br = by["mean_teacher"], by["brpg"]
    r0 = br
    what = f"{r0['backbone']} crop {r0['crop']} batch {r0['batch']}+{r0['batch']}" + (", amp is a no-op on cpu" if r0["device"] == "cpu" else "")
    rows += [(f"train_step_{amp}", f"mean teacher ({what})", 1e3 * mt["median_s"], "ms/it"),
             (f"train_step_{amp}", f"BRPG ({br.get('num_prototypes', '?')} prototypes)", 1e3 * br["median_s"], "ms/it"),
             (f"train_step_{amp}", "BRPG / mean teacher", br["median_s"] / mt["median_s"], "x")]
    if "peak_mem_mb" in br:
        rows += [(f"train_step_{amp}", "peak memory mean teacher", mt["peak_mem_mb"], "MiB"),
                 (f"train_step_{amp}", "peak memory BRPG", br["peak_mem_mb"], "MiB")]

t = json.loads((out / "train_200.json").read_text())
rows += [("train_200", f"{t['iterations']} iterations, demo config, {t['view_samples']} view samples: wall", t["wall_s"], "s"),
         ("train_200", "iterations / wall second", t["it_per_s"], "it/s"),
         ("train_200", "training it/s (trainer log, median)", t["train_it_per_s"], "it/s")]
if t.get("peak_mem_mb") is not None: rows.append(("train_200", "peak GPU memory", t["peak_mem_mb"], "MiB"))
for name, dt in times.items(): rows.append(("wall", f"stage {name}", float(dt), "s"))
rows.append(("wall", "total", total, "s"))

bad = [f"{s}: {i}" for s, i, v, _ in rows if not isinstance(v, (int, float)) or not math.isfinite(v)]
if bad: fail("non-numeric values: " + "; ".join(bad))
fmt = lambda v: f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
lines = [f"gpu_check{' --dry-run (CPU, tiny sizes: not the official numbers)' if dry else ''}: "
         f"device {env['device']}, torch {env['torch']}, commit {env['commit']}", "",
         "| stage | measurement | value | unit |", "|---|---|---|---|"]
lines += [f"| {s} | {i} | {fmt(v)} | {u} |" for s, i, v, u in rows]
md = "\n".join(lines) + "\n"
(out / "gpu_check.md").write_text(md)
print(md, end="")
PY
echo "table: $OUT/gpu_check.md"
