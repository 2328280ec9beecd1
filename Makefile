# Two commands do everything on a fresh machine:
#   make demo   set up, build, and run the main study on the tiny world
#   make test   set up, build, and run every test (unit, integration, parity)
#   make hardening   the fault, bad-input and path checks, with their counts (CI runs it too)
#
# PyTorch 2.11.0 (the libtorch that tch 0.24 binds) and the Python test oracles live in a venv
# outside the clone, and the cargo target directory too, so fresh clones and CI reuse both.
RIL_HOME ?= $(HOME)/.cache/ril-pipe
VENV := $(RIL_HOME)/venv
PY := $(VENV)/bin/python
export RIL_HOME
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
export CARGO_TARGET_DIR ?= $(RIL_HOME)/target
export RIL_FIXTURES ?= $(RIL_HOME)/fixtures
BIN := $(CARGO_TARGET_DIR)/debug/ril-pipe

.PHONY: setup build test hardening demo study tiny-world ablations fixtures bench clean-cache slurm-check smoke

setup: $(VENV)/.installed

$(VENV)/.installed: scripts/requirements-test.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
	touch $@

build: setup
	cargo build --bins

fixtures: setup
	$(PY) tests/parity/make_fixtures.py --out $(RIL_FIXTURES)

test: build fixtures
	cargo test --no-fail-fast

# Faults injected (kill -9, damaged objects, a full disk, concurrent runs), bad input tried
# (a pipeline fuzzer, malformed pipelines and weight files), paths kept inside the cache; each
# check prints its counts. About 10 minutes.
hardening: build fixtures
	cargo test --test hardening -- --test-threads=2

# The studies run two stages at a time (-j 2, the threads shared out): on the 2-core development
# machine the tiny world's stages are too small to keep two threads busy each, and two at a time
# ran 1.6x faster (measured 2026-12-04).
STUDY_JOBS ?= 2

demo: build
	$(BIN) run pipelines/all_orders.yaml -j $(STUDY_JOBS)

# The main study over three training seeds (seed 0 is the demo's, from the cache after `make
# demo`); its report: reports/all_orders_seeds/ (one folder per seed and the seeds report).
study: build
	$(BIN) run pipelines/all_orders_seeds.yaml -j $(STUDY_JOBS)

# Regenerates tiny/weights/ from pipelines/tiny_world.yaml with a release build, as the committed
# weights were made (41 minutes on 2 idle cores, measured; the same bytes as tiny/weights/).
tiny-world: setup
	cargo build --release --bins
	$(CARGO_TARGET_DIR)/release/ril-pipe run pipelines/tiny_world.yaml -j 2
	$(CARGO_TARGET_DIR)/release/ril-pipe export pipelines/tiny_world.yaml --stage export --to tiny/weights

# The four ablations on the tiny world (lambda, EMA momentum, last vs full step, adapter group
# vs one shared LoRA); each ends in its report under reports/ablation_<name>/.
ablations: build
	for a in lambda ema distill adapter; do $(BIN) run pipelines/ablations/$$a.yaml -j $(STUDY_JOBS) || exit 1; done

# Benchmarks print their figures; the dev profile is the one the tests and the demo use.
bench: build fixtures
	cargo bench --profile dev

# The CI regression gate: a short study on the tiny world, then its metrics against the
# committed baseline (tolerances in the file; `ril-pipe check --update` rewrites it on purpose).
smoke: build
	$(BIN) run pipelines/smoke.yaml --no-progress
	$(BIN) check --baseline tests/baselines/smoke.json pipelines/smoke.yaml

# A real one-node Slurm cluster (installed from Debian's packages when missing; needs root):
# the random-world study through `--executor slurm`, compared with a local run.
slurm-check: build fixtures
	scripts/slurm_check.sh $(BIN) tests/pipelines/random_world.yaml
