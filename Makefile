# mm: `make preprocess` then `make train`; `make test` runs the suite.
# Every target creates .venv (and installs the project) when it is missing.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_N ?= 2000

.PHONY: install test preprocess train bench-preprocess bench-loader bench-train bench-image lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

data/demo/manifest.jsonl: | $(STAMP)
	$(VENV)/bin/mmdata demo-data --out data/demo --n $(DEMO_N) --seed 0

preprocess: $(STAMP) data/demo/manifest.jsonl
	$(VENV)/bin/mmdata preprocess pipelines/demo.yaml $(ARGS)

# builds (or reuses) the demo shards through the experiment's data config, then trains
train: $(STAMP) data/demo/manifest.jsonl
	$(VENV)/bin/mmtrain train pipelines/train.yaml $(ARGS)

bench-train: $(STAMP) data/demo/manifest.jsonl
	$(PY) benchmarks/bench_train.py $(ARGS)

# real photographed digits (scikit-learn ships them): which image encoder learns them, at what CPU time
bench-image: $(STAMP)
	$(PY) -c "import sklearn" 2>/dev/null || $(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/bench_image.py $(ARGS)

bench-preprocess: $(STAMP)
	$(PY) benchmarks/bench_preprocess.py $(ARGS)

# preprocess reuses shards that are current (seconds) and rebuilds those an older mm wrote
bench-loader: $(STAMP) data/demo/manifest.jsonl
	$(VENV)/bin/mmdata preprocess pipelines/demo.yaml
	$(VENV)/bin/mmdata preprocess pipelines/demo.yaml image.size=224 output.name=demo224
	$(PY) benchmarks/bench_loader.py --dataset data/datasets/demo --dataset data/datasets/demo224 $(ARGS)
	$(PY) benchmarks/bench_remote.py --dataset data/datasets/demo224 $(REMOTE_ARGS)

lint: $(STAMP)
	$(PY) -m pyflakes mmdata mmtrain tests benchmarks
	$(PY) -m pytest -q tests/test_layout.py   # prep and load never import each other; mmdata never imports mmtrain

clean:
	rm -rf data/datasets runs .pytest_cache
