#!/usr/bin/env bash
# One-shot GPU check (issue #20, point 3): correctness and speed of the engine on a CUDA GPU, in ~8 minutes.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh                  # on the GPU machine (OUT: where results go)
#   OUT=/tmp/out bash scripts/gpu_check.sh --device cpu --quick   # end to end on a CPU, in a few minutes
#
# Needs torch (+ CUDA), torchvision, numpy, scipy, scikit-image, imageio, pyyaml, safetensors, huggingface_hub,
# tqdm, pytest. Needs NO dlib, face-alignment, gradio, imageio-ffmpeg or network: landmarks come from the
# fixtures (reference tests) or are synthetic (benchmarks, labelled so). Reference fixtures: $MEFACIAL_FIXTURES
# (e.g. a copy in the ignored folder .shared_fixtures/).
#
# Parts, each under its own `timeout` so that one failure or hang loses nothing else:
#   1. nvidia-smi, versions                           -> parts/env.json
#   2. reference-fixture tests on the device, fp32 (TF32 off), the fixtures' tolerances; CUDA engine tests
#   3. fused vs unfused outputs, fp32 / bf16 / fp16    -> parts/fusion.json
#   4. python -m mefacial bench: fomm-awp, mraa-awp and every training-free generator, batch 1, 4, 16, 64,
#      fp32 / bf16 / fp16 (fps, peak memory), synthetic landmarks    -> parts/bench-bsN.json
#   5. torch.compile: fomm-awp bf16 batch 64 (eager vs compiled)     -> parts/compile.json
#   6. one training step of each learned variant, bf16 and fp32 (benchmarks/train_step.py, when present)
# Results in $OUT (3 files): log.txt (everything printed), gpu_check.json (all parts merged), summary.md.
set -uo pipefail

DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "usage: OUT=DIR bash scripts/gpu_check.sh [--device cuda|cpu] [--quick]" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PARTS="$(mktemp -d -t gpu_check.XXXXXX)"  # each part's JSON, merged into $OUT at the end
trap 'rm -rf "$PARTS"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
export MEFACIAL_FIXTURES="${MEFACIAL_FIXTURES:-$PWD/.shared_fixtures}"
[ -d "$MEFACIAL_FIXTURES" ] || export MEFACIAL_FIXTURES="$PWD/../shared/fixtures/reference"
STARTED=$SECONDS

if [ "$QUICK" = 1 ]; then  # a CPU smoke run of every part: tiny sizes, one repeat
  BATCHES="1 4"; PRECISIONS="fp32 bf16"; REPEATS=1; FUSION_FRAMES=4; COMPILE_ARGS="--batch-size 2 --frames 4 --repeats 1"
  T_TESTS=900; T_FUSION=600; T_BENCH=600; T_COMPILE=300; T_TRAIN=300
else
  BATCHES="1 4 16 64"; PRECISIONS="fp32 bf16 fp16"; REPEATS=2; FUSION_FRAMES=16; COMPILE_ARGS="--batch-size 64 --frames 128 --repeats 3"
  T_TESTS=100; T_FUSION=45; T_BENCH=35; T_COMPILE=90; T_TRAIN=60
fi

{
part() { echo; echo "=== $1 ($((SECONDS - STARTED)) s) ==="; }
status() {  # name rc: one line per part in the log, and parts/status.json at the end
  local what="ok"; [ "$2" = 124 ] && what="TIMEOUT" || { [ "$2" != 0 ] && what="FAILED rc=$2"; }
  echo "--- $1: $what"; echo "$1 $2" >> "$PARTS/status.txt"
}

part "1. machine and versions"
timeout 30 nvidia-smi; status nvidia-smi $?
timeout 60 python benchmarks/gpu_check.py env --device "$DEVICE" --out "$PARTS/env.json" && cat "$PARTS/env.json" && echo
status env $?

part "2. reference fixtures on $DEVICE (fp32, TF32 off, the fixtures' tolerances) + CUDA engine tests"
echo "fixtures: $MEFACIAL_FIXTURES: $(ls "$MEFACIAL_FIXTURES" 2>/dev/null | tr '\n' ' ')"
# test_landmarks (dlib) and the app tests (gradio) are not run here: no dlib / gradio on this machine, and
# nothing in them depends on the device. These tests take landmarks and AU points from the fixtures.
MEFACIAL_TEST_DEVICE="$DEVICE" timeout "$T_TESTS" python -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/test_fomm_reference.py tests/test_mraa_reference.py tests/test_cuda.py -rs --junitxml="$PARTS/tests.xml"
status reference-tests $?

part "3. fused vs unfused outputs (fp32 / bf16 / fp16)"
timeout "$T_FUSION" python benchmarks/gpu_check.py fusion --device "$DEVICE" --frames "$FUSION_FRAMES" \
  --out "$PARTS/fusion.json"
status fusion $?

part "4. bench: fomm-awp, mraa-awp and the training-free generators, batch $BATCHES, $PRECISIONS"
FREE="$(timeout 60 python benchmarks/gpu_check.py variants)"
echo "training-free generators: $FREE"
for BS in $BATCHES; do
  FRAMES=$(( BS * 2 > 32 ? BS * 2 : 32 )); [ "$QUICK" = 1 ] && FRAMES=$(( BS * 2 ))
  timeout "$T_BENCH" python -m mefacial bench --device "$DEVICE" --landmarks synthetic --variants fomm-awp mraa-awp $FREE \
    --batch-size "$BS" --frames "$FRAMES" --precisions $PRECISIONS --repeats "$REPEATS" --json "$PARTS/bench-bs$BS.json"
  status "bench-bs$BS" $?
done

part "5. torch.compile: fomm-awp bf16 batch 64, eager vs compiled"
TORCHINDUCTOR_CACHE_DIR="$PARTS/inductor" timeout "$T_COMPILE" python benchmarks/gpu_check.py compile --device "$DEVICE" $COMPILE_ARGS --out "$PARTS/compile.json"
status compile $?

part "6. one training step of each learned variant, bf16 and fp32"
if [ -f benchmarks/train_step.py ]; then
  HELP="$(timeout 60 python benchmarks/train_step.py --help 2>&1)"; echo "$HELP" | head -30
  SHORT=""  # one timed step per row, when the script has the options
  echo "$HELP" | grep -q -- "--repeats" && SHORT="--repeats 1"
  echo "$HELP" | grep -q -- "--warmup" && SHORT="$SHORT --warmup 0"
  for P in bf16 fp32; do
    timeout $(( T_TRAIN / 2 )) python benchmarks/train_step.py --device "$DEVICE" --precision "$P" $SHORT
    status "train-step-$P" $?
  done
else
  echo "benchmarks/train_step.py is not in this checkout (issue #19): no training step measured"
  status train-step 127
fi

part "merge"
python - "$PARTS" <<'EOF'
import json, sys, pathlib
parts = pathlib.Path(sys.argv[1])
lines = (parts / "status.txt").read_text().split("\n") if (parts / "status.txt").exists() else []
status = {name: int(rc) for name, rc in (line.split() for line in lines if line.strip())}
(parts / "status.json").write_text(json.dumps(status, indent=2))
EOF
timeout 60 python benchmarks/gpu_check.py merge "$PARTS" --out "$OUT/gpu_check.json" --md "$OUT/summary.md"
status merge $?
[ -f "$PARTS/tests.xml" ] && cp "$PARTS/tests.xml" "$OUT/tests.xml"
echo; echo "parts: $(cat "$PARTS/status.txt" | tr '\n' ';')"
echo "done in $((SECONDS - STARTED)) s; results: $OUT/log.txt, $OUT/gpu_check.json, $OUT/summary.md, $OUT/tests.xml"
} 2>&1 | tee "$OUT/log.txt"
