#!/usr/bin/env bash
# The CUDA check, for when a GPU machine is lent (issue 26 item 4). About 10 minutes at most:
#   1. tests/engine/test_device.py, its `needs CUDA` tests included;
#   2. dense perplexity on CUDA vs the CPU, fp32: within 1e-3 relative;
#   3. the README's main job (recipes/smollm2-shortgpt-gptq4.yaml) with --device cuda, when
#      smollm2-135m is on this machine (it is skipped, and said so, when it is not);
#   4. Wanda 50% of a random model with Llama-3.2-1B's shapes (bench/make_random_llama.py)
#      with --device cuda, one layer at a time on the GPU: must finish within PRUNE_LIMIT_S.
# Prints one PASS/FAIL line per check and a summary; exit 0 only if every check passed.
# Without CUDA: one line, "no CUDA device: ...", exit 2, before anything else runs.
#
#   bash scripts/gpu_check.sh            (WORK=folder keeps the outputs; default: a temp dir)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PRUNE_LIMIT_S=${PRUNE_LIMIT_S:-240}  # the stated time for the 1B-shaped prune on one GPU

why=$("$PY" - <<'EOF' 2>&1
import torch
if not torch.cuda.is_available():
    print("this torch is built without CUDA" if torch.version.cuda is None else
          "torch sees no CUDA device (check the driver and CUDA_VISIBLE_DEVICES)")
EOF
)
if [ -n "$why" ]; then
    echo "no CUDA device: ${why##*$'\n'}; scripts/gpu_check.sh checks secateur on CUDA" >&2
    exit 2
fi

WORK=${WORK:-$(mktemp -d -t secateur-gpu-check.XXXXXX)}
mkdir -p "$WORK"
SECATEUR=("$PY" -m secateur.cli)
START=$SECONDS
failed=0
say() { printf '%s\n' "$*" | tee -a "$WORK/summary.txt"; }
check() {  # check NAME LIMIT_S COMMAND...: runs it under a timeout, logs, says PASS/FAIL
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    if timeout "$limit" "$@" >"$WORK/$name.log" 2>&1; then
        say "PASS $name ($((SECONDS - t0)) s)"
    else
        local rc=$?
        say "FAIL $name (exit $rc after $((SECONDS - t0)) s; log: $WORK/$name.log)"
        tail -n 5 "$WORK/$name.log" | sed 's/^/    /'
        failed=1
    fi
}
say "gpu_check on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))'), work in $WORK"

# 1. the device tests, the CUDA-only ones included
check device-tests 180 env OMP_NUM_THREADS=4 "$PY" -m pytest tests/engine/test_device.py -q -rs

# the 1B-shaped random model (used by 2 when smollm2 is absent, and by 4)
TOK="$WORK/tokenizer"
"$PY" -c "import sys; from tests.tiny_models import byte_tokenizer; \
byte_tokenizer().save_pretrained(sys.argv[1])" "$TOK"
check make-1b 120 "$PY" bench/make_random_llama.py 1b "$WORK/llama-1b-shape" \
    --tokenizer-from "$TOK"

# 2. dense perplexity, fp32, CUDA vs CPU
if "$PY" -c "import secateur; secateur.load('smollm2-135m')" >/dev/null 2>&1; then
    PPL_MODEL=smollm2-135m; SMOLLM2=1
else
    PPL_MODEL="$WORK/llama-1b-shape"; SMOLLM2=0
fi
for dev in cpu cuda; do
    check "ppl-$dev" 150 "${SECATEUR[@]}" eval "$PPL_MODEL" --data c4-sample --seqlen 512 \
        --max-windows 8 --dtype float32 --device "$dev" --json "$WORK/ppl-$dev.json" --overwrite
done
check ppl-cuda-vs-cpu 30 "$PY" - "$WORK/ppl-cpu.json" "$WORK/ppl-cuda.json" <<'EOF'
import json, sys
cpu, gpu = (json.load(open(p)) for p in sys.argv[1:3])
rel = abs(gpu["perplexity"] / cpu["perplexity"] - 1)
print(f"perplexity cpu {cpu['perplexity']:.6f} cuda {gpu['perplexity']:.6f} rel {rel:.2e}")
assert gpu["protocol"]["device"].startswith("cuda"), gpu["protocol"]
sys.exit(0 if rel < 1e-3 else 1)
EOF
grep -h "^perplexity cpu" "$WORK/ppl-cuda-vs-cpu.log" 2>/dev/null | sed 's/^/    /' \
    | tee -a "$WORK/summary.txt"

# 3. the main job on CUDA
if [ "$SMOLLM2" = 1 ]; then
    check main-job 240 "${SECATEUR[@]}" run recipes/smollm2-shortgpt-gptq4.yaml \
        --out "$WORK/main-job" --device cuda --json "$WORK/main-job.json" --overwrite
else
    say "SKIP main-job (smollm2-135m is not on this machine)"
fi

# 4. a 1B-shaped prune, one layer at a time on the GPU, within the stated time
check "prune-1b-under-${PRUNE_LIMIT_S}s" "$PRUNE_LIMIT_S" "${SECATEUR[@]}" prune \
    "$WORK/llama-1b-shape" --method wanda --sparsity 0.5 --calib c4-sample --nsamples 32 \
    --seqlen 512 --eval none --device cuda --out "$WORK/llama-1b-wanda" \
    --json "$WORK/prune-1b.json" --overwrite
"$PY" - "$WORK/prune-1b.json" <<'EOF' 2>/dev/null | tee -a "$WORK/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"    1B-shaped wanda on {r['device']} ({r.get('device_name')}): prune "
      f"{r['timings']['prune_seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
      f"peak GPU {r.get('peak_device_mib') or 0:.0f} MiB")
EOF

say "total $((SECONDS - START)) s; $([ $failed = 0 ] && echo 'all checks passed' || echo 'SOME CHECKS FAILED')"
exit $failed
