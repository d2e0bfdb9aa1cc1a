#!/usr/bin/env bash
# The one prepared call for a GPU machine (issue 27): every CUDA test, throughput and MFU,
# the official JAX step on the same GPU, GPU JPEG decoding, then the gpu reproduction with the
# time left. Each part runs under its own timeout inside one overall deadline, a failing part
# does not stop the next, and everything lands under $OUT in at most 8 files: summary.json
# (every part's status, seconds and numbers) and one log per part (+ the reproduction's results).
#
#   bash benchmarks/device_check.sh --payload .payload   # here: assemble what must travel, print its size
#   bash benchmarks/device_check.sh                      # there (reads .payload; see benchmarks/README.md)
#   bash benchmarks/device_check.sh --dry-run            # here: every part on the CPU at smoke size, < 3 min
#
# --budget-s N: the overall deadline (default 530 s, inside the device call's 9 minutes).
# Environment: PYTHON (default python3; a dry run: .venv/bin/python when there is one), OUT (default device_check_out), M3AE_SHARED (the shared
# folder to take data and fixtures from, default ../shared), M3AE_WHEELS (wheels to carry,
# default .whl), M3AE_OFFICIAL_REPO (young-geng/m3ae_public: an extracted tree or a git dir),
# JAX_PYTHON (the python that runs part (c), default PYTHON: a separate JAX venv here).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
JPY=${JAX_PYTHON:-$PY}
DRY=0 PAYLOAD="" ASSEMBLE_ONLY=0 BUDGET=530
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --payload) PAYLOAD=$2; ASSEMBLE_ONLY=1; shift ;;
    --budget-s) BUDGET=$2; shift ;;
    *) echo "device_check.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
# Here (a dry run) the project's own environment when there is one: the machine's python3 may
# hold no torch. The device's python3 holds its own torch, so there the default stays.
if [ $DRY = 1 ] && [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then
  PY=$ROOT/.venv/bin/python; JPY=${JAX_PYTHON:-$PY}
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
SHARED=${M3AE_SHARED:-$ROOT/../shared}
LIMIT_MIB=64

# ------------------------------------------------------------------ the payload
assemble() {  # DIR: the data, fixtures, wheels and official code the device needs
  local dir=$1 tin=$SHARED/data/tiny-imagenet-captions cifar=$SHARED/data/cifar10
  rm -rf "$dir" && mkdir -p "$dir/shared/data/tiny-imagenet-captions" "$dir/shared/data/cifar10" \
    "$dir/shared/fixtures" "$dir/coco" "$dir/wheels" || return 1
  # 5 of the 8 train shards (every class is in every shard), 1 val shard, the CIFAR-10 test shard
  # and 2 train shards (the gpu reproduction's near-OOD probe reads 10,000 CIFAR-10 train images).
  cp "$tin"/train-00000[0-4].tar.gz "$tin"/val-000000.tar.gz "$tin"/classes.tsv "$dir/shared/data/tiny-imagenet-captions/" || return 1
  cp "$cifar"/test-000000.tar.gz "$cifar"/train-00000[01].tar.gz "$cifar"/classes.txt "$dir/shared/data/cifar10/" || return 1
  cp -r "$SHARED/fixtures/official-jax" "$dir/shared/fixtures/" || return 1
  # 40 COCO photos for the decode benchmark (the whole coco-mini shard is 37 MB).
  "$PY" - "$SHARED/data/coco-mini/all-000000.tar.gz" "$dir/coco/photos-000000.tar" 40 <<'EOF' || return 1
import sys, tarfile
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
keys = []
with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
    for m in tin:
        key, _, ext = m.name.rpartition(".")
        if ext == "jpg":
            if len(keys) == n:
                break
            keys.append(key)
        if keys and key == keys[-1] and ext in ("jpg", "txt"):
            tout.addfile(m, tin.extractfile(m))
EOF
  local wheels=${M3AE_WHEELS:-$ROOT/.whl}
  if ls "$wheels"/*.whl >/dev/null 2>&1; then cp "$wheels"/*.whl "$dir/wheels/"; else
    echo "payload: no wheels in $wheels (pip download webdataset braceexpand ml_collections -d $wheels)" >&2; fi
  local off=${M3AE_OFFICIAL_REPO:-}
  if [ -n "$off" ] && [ -f "$off/m3ae/m3ae_main.py" ]; then
    mkdir -p "$dir/official" && cp -r "$off/m3ae" "$dir/official/"
  elif [ -n "$off" ] && git --git-dir="$off" rev-parse HEAD >/dev/null 2>&1; then
    mkdir -p "$dir/official" && git --git-dir="$off" archive HEAD m3ae | tar -x -C "$dir/official"
  else
    echo "payload: no official code (set M3AE_OFFICIAL_REPO); part (c) will be skipped" >&2
  fi
  local tree payload
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
  tree=${tree:-0}
  payload=$(du -sb "$dir" | cut -f1)
  echo "payload $dir: $((payload / 1048576)) MiB; with the working tree $(((tree + payload) / 1048576)) MiB of $LIMIT_MIB"
  [ $((tree + payload)) -le $((LIMIT_MIB * 1048576)) ] || { echo "payload: over the $LIMIT_MIB MiB a device call carries" >&2; return 1; }
}

if [ $ASSEMBLE_ONLY = 1 ]; then assemble "$PAYLOAD"; exit $?; fi

OUT=${OUT:-$ROOT/device_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ $DRY = 1 ]; then
  PAYLOAD=$WORK/payload
  assemble "$PAYLOAD" > "$OUT/payload.txt" 2>&1 || { cat "$OUT/payload.txt"; exit 1; }
  DEV=cpu
else
  PAYLOAD=$ROOT/.payload
  [ -d "$PAYLOAD/shared" ] || { echo "no payload at $PAYLOAD (bash $0 --payload .payload, and carry it)" >&2; exit 1; }
  if ls "$PAYLOAD"/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      "$PAYLOAD"/wheels/*.whl > "$OUT/payload.txt" 2>&1 || echo "wheel install failed" >> "$OUT/payload.txt"
  fi
  DEV=cuda
fi
export PYTHONPATH="$ROOT/src${WORK:+:$WORK/site}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export M3AE_SHARED=$PAYLOAD/shared M3AE_SHARED_DATA=$PAYLOAD/shared/data
: > "$WORK/parts.jsonl"

record() {  # NAME STATUS SECONDS [JSON file with the part's numbers]
  "$PY" - "$WORK/parts.jsonl" "$@" <<'EOF'
import json, os, sys
path, name, status, secs = sys.argv[1:5]
rec = {"part": name, "status": status, "seconds": int(secs)}
if len(sys.argv) > 5 and os.path.isfile(sys.argv[5]):
    try:
        rec["result"] = json.load(open(sys.argv[5]))
    except ValueError as e:
        rec["result_error"] = str(e)
open(path, "a").write(json.dumps(rec) + "\n")
EOF
  echo "== $1: $2 (${3}s)"
}

part() {  # NAME LIMIT_S LOG RESULT_JSON CMD...: run under min(LIMIT, time left); record the outcome
  local name=$1 limit=$2 log=$3 res=$4; shift 4
  local left=$((DEADLINE - $(date +%s) - 5))
  if [ $left -lt 15 ]; then record "$name" "skipped: out of time (${left}s left of the ${BUDGET}s budget)" 0; return; fi
  [ $limit -gt $left ] && limit=$left
  local t0 rc status
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*" >> "$log"
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status="failed: timed out after ${limit}s" ;; *) status="failed: exit $rc" ;; esac
  record "$name" "$status" $(($(date +%s) - t0)) "$res"
}

skip() { record "$1" "skipped: $2" 0; }

# ------------------------------------------------------------------ the parts
if [ $DRY = 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv > "$WORK/gpu.txt" 2>&1
fi
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" >> "$WORK/gpu.txt" 2>&1

# (a) every CUDA test (on the CPU in the dry run: the same tests, M3AE_GPU_TEST_DEVICE=cpu)
A=$OUT/a_pytest.log
M3AE_GPU_TEST_DEVICE=$DEV M3AE_REQUIRE_SHARED_DATA=1 part a_pytest_gpu 240 "$A" "" \
  "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/gpu

# (b) throughput and MFU (ViT-B/16, 256 px, text 64, batch 256, bf16), official's precision, memory
B=$OUT/b_throughput.log
if [ $DRY = 1 ]; then
  size=(--preset tiny --batch 8 --text-len 16 --steps 2 --warmup 1 --burst-s 0.02 --device cpu --threads 1)
  part b_eager_bf16 90 "$B" "$WORK/b1.json" "$PY" benchmarks/train_throughput.py "${size[@]}" train.precision=bf16 --json "$WORK/b1.json"
  skip b_compiled_bf16 "torch.compile on the CPU takes minutes here; the device run compiles"
  part b_eager_fp32_tf32 90 "$B" "$WORK/b3.json" "$PY" benchmarks/train_throughput.py "${size[@]}" --json "$WORK/b3.json"
  part b_memory 90 "$B" "$WORK/b4.json" "$PY" benchmarks/memory.py --config tiny --batch 4 --device cpu --json "$WORK/b4.json"
else
  size=(--preset base --batch 256 --text-len 64 --device cuda --nominal-peak-tflops 790)
  part b_eager_bf16 75 "$B" "$WORK/b1.json" "$PY" benchmarks/train_throughput.py "${size[@]}" --steps 20 --warmup 5 train.precision=bf16 --json "$WORK/b1.json"
  part b_compiled_bf16 120 "$B" "$WORK/b2.json" "$PY" benchmarks/train_throughput.py "${size[@]}" --steps 20 --warmup 10 train.precision=bf16 train.compile=true --json "$WORK/b2.json"
  # fp32 with TF32 matmuls: the official JAX code's precision on a GPU (jax's default for float32 dots)
  part b_eager_fp32_tf32 60 "$B" "$WORK/b3.json" "$PY" benchmarks/train_throughput.py "${size[@]}" --steps 8 --warmup 3 --tf32 --json "$WORK/b3.json"
  part b_memory_large_b64 90 "$B" "$WORK/b4.json" "$PY" benchmarks/memory.py --config large --batch 64 --device cuda --precision bf16 --json "$WORK/b4.json"
fi

# (c) the official JAX train step at the same size on the same device
C=$OUT/c_official_jax.log
if [ ! -f "$PAYLOAD/official/m3ae/m3ae_main.py" ]; then
  skip c_official_jax "the official code is not in the payload (M3AE_OFFICIAL_REPO was unset when it was assembled)"
elif ! "$JPY" -c "import jax, flax, optax, ml_collections" >> "$C" 2>&1; then
  skip c_official_jax "jax, flax, optax or ml_collections is not installed for $JPY"
elif [ $DRY = 1 ]; then
  part c_official_jax 150 "$C" "$WORK/c.json" "$JPY" benchmarks/official_jax_step.py --official-repo "$PAYLOAD/official" --size bench-cpu --batch 4 --steps 1 --warmup 0 --threads 1 --json "$WORK/c.json"
else
  part c_official_jax 120 "$C" "$WORK/c.json" "$JPY" benchmarks/official_jax_step.py --official-repo "$PAYLOAD/official" --size h200 --steps 10 --warmup 3 --threads 0 --json "$WORK/c.json"
fi

# (d) GPU JPEG decode + augmentation at 256 px on COCO photos
D=$OUT/d_decode.log
if [ $DRY = 1 ]; then n=(--samples 32 --batch 16 --rounds 1); else n=(--samples 1024 --batch 256 --rounds 3); fi
part d_jpeg_decode 60 "$D" "$WORK/d.json" "$PY" benchmarks/gpu_decode.py --urls "$PAYLOAD/coco/photos-000000.tar" --image-size 256 --device $DEV "${n[@]}" --json "$WORK/d.json"

# (e) the gpu reproduction with the time left
E=$OUT/e_reproduce.log
if ! "$PY" experiments/reproduce.py --help 2>/dev/null | grep -q -- "--budget-s"; then
  skip e_reproduce_gpu "experiments/reproduce.py has no --mode gpu --budget-s yet"
elif [ $DRY = 1 ]; then
  # --out/--docs: the rehearsal leaves the working tree's docs/ as they are
  part e_reproduce_gpu 120 "$E" "" "$PY" experiments/reproduce.py --mode gpu --smoke --device cpu \
    --out "$WORK/reproduce" --docs "$WORK/docs"
else
  left=$((DEADLINE - $(date +%s) - 20))
  if [ $left -lt 90 ]; then skip e_reproduce_gpu "only ${left}s left"; else
    part e_reproduce_gpu $((left + 10)) "$E" "" "$PY" experiments/reproduce.py --mode gpu --budget-s $left --device cuda
  fi
fi
# The reproduction's JSON and report travel back as one file (when it wrote any).
if ls "$ROOT"/docs/results/gpu* >/dev/null 2>&1; then
  (cd "$ROOT" && tar -czf "$OUT/e_results.tar.gz" docs/results/gpu* docs/results.md)
fi

"$PY" - "$WORK/parts.jsonl" "$WORK/gpu.txt" "$OUT/summary.json" $DRY $(($(date +%s) - START)) <<'EOF'
import json, sys
parts = [json.loads(line) for line in open(sys.argv[1])]
summary = {"dry_run": sys.argv[4] == "1", "wall_s": int(sys.argv[5]), "machine": open(sys.argv[2]).read().strip(),
           "ok": all(p["status"] == "ok" or p["status"].startswith("skipped") for p in parts), "parts": parts}
# The side-by-side figure: our step's samples/s over the official JAX step's, same device and size.
res = {p["part"]: p.get("result") or {} for p in parts}
official = res.get("c_official_jax", {}).get("samples_per_s")
if official:
    summary["vs_official"] = {name: round(res[name]["samples_per_s"] / official, 2) for name in
                              ("b_eager_bf16", "b_compiled_bf16", "b_eager_fp32_tf32") if res.get(name, {}).get("samples_per_s")}
json.dump(summary, open(sys.argv[3], "w"), indent=1)
for p in parts:
    print(f"{p['part']:22s} {p['status']} ({p['seconds']} s)")
if "vs_official" in summary:
    print("samples/s over the official JAX step's:", summary["vs_official"])
print(f"wall {summary['wall_s']} s; {'all parts ok or skipped' if summary['ok'] else 'SOME PARTS FAILED'}; {sys.argv[3]}")
EOF
