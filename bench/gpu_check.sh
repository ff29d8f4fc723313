#!/usr/bin/env bash
# GPU readiness, as one script a machine with a CUDA GPU runs as it is (from the repository root,
# with the project installed: pip install torch && pip install -e '.[dev]'):
#   bash bench/gpu_check.sh               # about 10 minutes on one GPU
# 1. the tests that load a model, on the GPU (PATCHSWEEP_TEST_DEVICE=cuda: the worker on cuda, the
#    plain-PyTorch references on the CPU, every number compared as on the CPU);
# 2. the main benchmarks (patching sweeps, AtP*, edges, circuits) in float32 and bfloat16;
# 3. one table at the end: each benchmark's throughput per dtype, and the tests' result.
# DEVICE=cpu runs the same on the CPU (a dry run of the script itself). Output: OUT (default
# gpu_check/), each step's full log beside the table.
set -uo pipefail
cd "$(dirname "$0")/.."
device=${DEVICE:-cuda}
out=${OUT:-gpu_check}
mkdir -p "$out"
python - "$device" <<'EOF' || { echo "no $device device here (torch $(python -c 'import torch; print(torch.__version__)'))"; exit 2; }
import sys, torch
sys.exit(0 if sys.argv[1] != "cuda" or torch.cuda.is_available() else 1)
EOF

PATCHSWEEP_TEST_DEVICE=$device python -m pytest -q tests/test_patching.py tests/test_families.py \
    tests/test_attention_sites.py tests/test_atpstar.py tests/test_edges.py tests/test_circuits.py tests/test_toy_ioi.py \
    > "$out/tests.log" 2>&1
tests=$(tail -n 1 "$out/tests.log")

rows=()
for dtype in float32 bfloat16; do
    python -m bench.sweeps --device "$device" --dtype "$dtype" resid:each head:END \
        resid,attn,mlp,head,q,k:each:logit_diff:atpstar \
        > "$out/sweeps-$dtype.log" 2>&1
    python -m bench.edges --device "$device" --dtype "$dtype" > "$out/edges-$dtype.log" 2>&1
    python -m bench.circuits --device "$device" --dtype "$dtype" > "$out/circuits-$dtype.log" 2>&1
    # each benchmark's pairs/s column (circuits: pairs x circuits/s)
    sweep=$(awk '/^resid:each/ {print $4; exit}' "$out/sweeps-$dtype.log")
    heads=$(awk '/^head:END/ {print $4; exit}' "$out/sweeps-$dtype.log")
    atpstar=$(awk '$1 ~ /:atpstar$/ {print $4; exit}' "$out/sweeps-$dtype.log")
    eap=$(awk '$1 == "eap" {print $2; exit}' "$out/edges-$dtype.log")
    eapig=$(awk '$1 == "eap-ig" {print $4; exit}' "$out/edges-$dtype.log")
    circuits=$(awk 'found {print $1; exit} /pairs x circuits/ {found=1}' "$out/circuits-$dtype.log")
    rows+=("$(printf '%-9s %10s %10s %10s %10s %10s %12s' "$dtype" "${sweep:-fail}" "${heads:-fail}" \
        "${atpstar:-fail}" "${eap:-fail}" "${eapig:-fail}" "${circuits:-fail}")")
done

# batches sized to the device: the planner's estimate against torch's peak allocation, prompts of
# 256 tokens (AtP*'s QK fix holds [heads, tokens, tokens] per row: what a token bound alone misses)
python -m bench.batch_memory --device "$device" --tokens 256 --units 8192,32768 --methods atp,atpstar,eap,eap-ig \
    > "$out/batch-memory.log" 2>&1
planner=$(awk '$1 == "atpstar" {r = $5} END {print r}' "$out/batch-memory.log")

printf '\n%-9s %10s %10s %10s %10s %10s %12s   (pairs/s on %s; logs in %s/)\n' dtype resid:each head:END \
    atpstar eap eap-ig circuits/s "$device" "$out"
printf '%s\n' "${rows[@]}"
echo "tests on $device: $tests"
echo "AtP* batch memory, estimate / measured at 256 tokens: ${planner:-fail} (table in $out/batch-memory.log)"
