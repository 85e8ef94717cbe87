# `make demo`: install, train a plain and a residual net briefly on Fashion-MNIST (CPU), then their report.
# `make test`: install (with Fashion-MNIST, and Chromium where it can) and run the test suite.
# `make bench`: the performance benchmarks.
# `make bench-gpu`: the GPU check (benchmarks/gpu.py), with the Python that already has the project's dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision first, pinned, so that pip takes the builds this project is tested with.
TORCH := torch==2.14.1 torchvision==0.29.1
DATA ?= data
DEMO ?= demo
# Validation on 2,000 held-out training images keeps the demo's evaluations short.
DEMO_ARGS := --dataset fashion-mnist --data-dir $(DATA) --train-images 6000 --val-split 2000 --epochs 4
# lr 0.2: the weights move faster than BN's running statistics (momentum 0.1) can follow, and a validation
# catches them behind (plain20, seed 0: epoch 1 validates at 5.00 nats, 0.93 with recomputed statistics).
DEMO_RECIPE := --lr 0.2
RUNS := $(DEMO)/plain20 $(DEMO)/resnet20
# e.g. REPORT_ARGS="--sections curves spikes" for a shorter report
REPORT_ARGS ?=

# The GPU check installs nothing: this project's venv where there is one, else the machine's own Python.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

.PHONY: install test demo bench bench-gpu fashion-mnist chromium clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

test: install fashion-mnist chromium
	$(BIN)/python -m pytest -q -n 2 --durations=15

# Debian's package when root (it needs only the package registry), torchvision's download otherwise.
fashion-mnist: install
	@if [ -d /usr/share/datasets/fashion-mnist ] || [ -d $(DATA)/FashionMNIST/raw ] || [ -d $(DATA)/fashion-mnist ]; then \
		echo "Fashion-MNIST: found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; then \
		echo "Fashion-MNIST: installed Debian's dataset-fashion-mnist"; \
	else \
		$(BIN)/python -c "import torchvision; [torchvision.datasets.FashionMNIST('$(DATA)', train=t, download=True) for t in (True, False)]"; \
	fi

# The report's browser test renders the page in headless Chromium: Debian's package when root (it needs only the
# package registry), otherwise that test says it was skipped.
chromium:
	@if command -v chromium || command -v chromium-browser || command -v google-chrome; then \
		echo "Chromium: found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }; then \
		echo "Chromium: installed Debian's chromium"; \
	else \
		echo "Chromium: not installed (needs root and apt-get); the report's browser test will be skipped"; \
	fi

demo: install fashion-mnist
	rm -rf $(DEMO)
	$(BIN)/python -m train --model plain20 --out $(DEMO)/plain20 $(DEMO_ARGS) $(DEMO_RECIPE)
	$(BIN)/python -m train --model resnet20 --out $(DEMO)/resnet20 $(DEMO_ARGS) $(DEMO_RECIPE)
	$(BIN)/python -m diagnostics.report $(RUNS) --data-dir $(DATA) --out $(DEMO)/diagnostics $(REPORT_ARGS)
	@echo "demo: runs in $(DEMO)/plain20 and $(DEMO)/resnet20, figures and datasets in $(DEMO)/diagnostics, the report in"
	@echo "$(DEMO)/diagnostics/report.html"

bench: install fashion-mnist
	$(BIN)/python -m benchmarks.train_throughput
	$(BIN)/python -m benchmarks.monitor_cost
	$(BIN)/python -m benchmarks.analysis_overhead
	$(BIN)/python -m benchmarks.depth_scaling
	$(BIN)/python -m benchmarks.spikes_cost
	$(BIN)/python -m benchmarks.lightning_cost
	$(BIN)/python -m benchmarks.side_by_side
	$(BIN)/python -m benchmarks.compile_choice

bench-gpu:
	$(GPU_PYTHON) -m benchmarks.gpu --data-dir $(DATA)

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
