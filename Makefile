# One venv per checkout; every target that runs code depends on it.
PYTHON      ?= python3
VENV        ?= .venv
# The CPU wheel that lies on this kind of machine. GPU users: the same spec from PyPI is its CUDA
# build on Linux; another CUDA: make test TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
BIN         := $(VENV)/bin
PY          := $(BIN)/python
STAMP       := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test lint demo train iterate bench bench-quick gpu-check gpu-check-rehearsal clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, on its own: otherwise a dependency's unpinned "torch" pulls a CUDA build.
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test,bench,lora,lint,ray]"
	touch $(STAMP)

# Whole files per test process (--dist loadfile), so a module's fixtures are built once;
# TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests $(PYTEST_ARGS)

# ruff (pyflakes, pycodestyle, isort, bugbear; pyproject.toml) over the whole tree
lint: $(STAMP)
	$(BIN)/ruff check .

# make train SHARDS=runs/shards MODEL=path/to/model [OUT=runs/train] [CONFIG=run.yaml] [ARGS="--max-steps 100"]
# Under torchrun: $(BIN)/torchrun --nproc_per_node N -m train ... (same flags).
OUT ?= runs/train
train: $(STAMP)
	@test -n "$(SHARDS)" -a -n "$(MODEL)" || { echo "usage: make train SHARDS=DIR MODEL=PATH [OUT=DIR] [CONFIG=file.yaml] [ARGS=...]" >&2; exit 2; }
	$(PY) -m train --shards "$(SHARDS)" --model "$(MODEL)" --out "$(OUT)" $(if $(CONFIG),--config "$(CONFIG)") $(ARGS)

# make iterate PROMPTS=DIR POLICY=PATH (REWARD=module:function | REWARD_MODEL=PATH) [ROUNDS=2] [ITERATE_OUT=DIR] [ARGS=...]
# On-policy rounds: generate → judge → ingest → curate → tokenize → precompute-ref → train, per round (prefdata/iterate.py).
ROUNDS ?= 2
ITERATE_OUT ?= runs/iterate
iterate: $(STAMP)
	@test -n "$(PROMPTS)" -a -n "$(POLICY)" -a -n "$(REWARD)$(REWARD_MODEL)" || { echo "usage: make iterate PROMPTS=DIR POLICY=PATH (REWARD=module:function | REWARD_MODEL=PATH) [ROUNDS=N] [ITERATE_OUT=DIR] [ARGS=...]" >&2; exit 2; }
	$(BIN)/prefdata iterate --prompts "$(PROMPTS)" --policy "$(POLICY)" --out "$(ITERATE_OUT)" --rounds $(ROUNDS) \
		$(if $(REWARD),--reward "$(REWARD)") $(if $(REWARD_MODEL),--reward-model "$(REWARD_MODEL)") $(ARGS)

# The DPO paper's sentiment experiment in miniature on generated data, then on-policy rounds (demo/pipeline.py, demo/rounds.py).
DEMO_OUT ?= runs/demo
demo: $(STAMP)
	$(PY) -m demo --out "$(DEMO_OUT)" $(DEMO_ARGS)

# Every stage beside its peer (TRL, datasets: the .[bench] extra), medians of alternating runs → benchmarks/results/bench.json, bench.md.
# SECTIONS=model-hh,memory runs only those into the table there (same machine and sizes), e.g. after a stopped run;
# BENCH_OUT=DIR writes the table there instead (another machine's table beside this one).
BENCH_SECTIONS = $(if $(SECTIONS),--sections $(SECTIONS)) $(if $(BENCH_OUT),--out "$(BENCH_OUT)")
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_SECTIONS)

bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --quick $(BENCH_SECTIONS)

# On a CUDA machine: precompute-ref, train (DDP, FSDP2, LoRA, KTO, reward, a killed run resumed) on all visible GPUs with a ~100M model in bf16,
# and the bench-quick table on the GPU (benchmarks/results/bench-cuda.md); < 10 min. Without CUDA: one line, exit 0.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

# The same stages on this CPU (2 gloo processes, a small model, a few steps): the script checked before GPU time is spent.
gpu-check-rehearsal: $(STAMP)
	$(PY) benchmarks/gpu_check.py --rehearse

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
