# The two commands of the README. Both set everything up first (idempotent, a no-op when done).
#   make demo   - set up, then run the main job (simulator -> ingest -> windows printed as they close)
#   make test   - set up, then lint and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?= --duration 15

.PHONY: setup system-deps demo test lint bench default-model clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,fuzz]'
	touch $@

demo: setup
	$(BIN)/sacmf demo $(DEMO_ARGS)

# System packages the tests run for real: prometheus + promtool (tests/test_prometheus.py). Installed once,
# when missing, as root or with passwordless sudo. Where that is impossible or fails, a note, and those
# tests skip - except under CI=true, where this target and the tests fail: CI never skips them.
APT_PROMETHEUS = apt-get update -qq \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus

system-deps:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    sh -c '$(APT_PROMETHEUS)'; \
	  elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	    sudo -n sh -c '$(APT_PROMETHEUS)'; \
	  else \
	    false; \
	  fi || { \
	    echo "note: prometheus/promtool (Debian package prometheus) not installed:" \
	      "tests/test_prometheus.py skips (fails under CI=true)"; \
	    [ "$$CI" != true ]; \
	  }; \
	}

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint system-deps
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/sacmf bench-ingest

# The embedded default model (docs/MODEL_CARD.md): synthetic data, then about 30-45 minutes of CPU training.
default-model: setup
	$(BIN)/sacmf synth --out data --n-train 16000 --n-val 1000 --n-test 2000 --seed 0 --overwrite
	$(BIN)/sacmf train --data-root data/train --val-root data/val --backbone tiny \
	    --batch-size 32 --epochs 8 --lr 1e-3 --lambda-mi 0.1 --seed 0 --threads 1 --max-minutes 58 \
	    --out checkpoints/default --overwrite --version sacmf-tiny-synth16k-s0
	cp checkpoints/default/best.pt model/weights/default.pt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
