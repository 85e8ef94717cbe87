# `make demo`: install, train a plain and a residual net briefly on Fashion-MNIST (CPU), run the diagnostics.
# `make test`: install and run the test suite.   `make bench`: the performance benchmarks.
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
RUNS := $(DEMO)/plain20 $(DEMO)/resnet20
DIAG := --data-dir $(DATA) --out $(DEMO)/diagnostics

# The GPU check installs nothing: this project's venv where there is one, else the machine's own Python.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

.PHONY: install test demo bench bench-gpu fashion-mnist clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

test: install
	$(BIN)/python -m pytest -q

# Debian's package when root (it needs only the package registry), torchvision's download otherwise.
fashion-mnist: install
	@if [ -d /usr/share/datasets/fashion-mnist ] || [ -d $(DATA)/FashionMNIST/raw ] || [ -d $(DATA)/fashion-mnist ]; then \
		echo "Fashion-MNIST: found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; then \
		echo "Fashion-MNIST: installed Debian's dataset-fashion-mnist"; \
	else \
		$(BIN)/python -c "import torchvision; [torchvision.datasets.FashionMNIST('$(DATA)', train=t, download=True) for t in (True, False)]"; \
	fi

demo: install fashion-mnist
	rm -rf $(DEMO)
	$(BIN)/python -m train --model plain20 --out $(DEMO)/plain20 $(DEMO_ARGS)
	$(BIN)/python -m train --model resnet20 --out $(DEMO)/resnet20 $(DEMO_ARGS)
	$(BIN)/python -m diagnostics.curves $(RUNS) --out $(DEMO)/diagnostics
	$(BIN)/python -m diagnostics.evaluate $(RUNS) --epochs last $(DIAG)
	$(BIN)/python -m diagnostics.responses $(RUNS) --epochs last $(DIAG)
	$(BIN)/python -m diagnostics.gradients $(RUNS) --epochs last --init plain20 --init resnet20 $(DIAG)
	$(BIN)/python -m diagnostics.flops $(RUNS) resnet56 plain56 resnet110 $(DIAG)
	$(BIN)/python -m diagnostics.attributions $(RUNS) $(DIAG)
	$(BIN)/python -m diagnostics.spikes $(RUNS) $(DIAG)
	@echo "demo: runs in $(DEMO)/plain20 and $(DEMO)/resnet20, figures and datasets in $(DEMO)/diagnostics"

bench: install fashion-mnist
	$(BIN)/python -m benchmarks.train_throughput
	$(BIN)/python -m benchmarks.monitor_cost
	$(BIN)/python -m benchmarks.analysis_overhead
	$(BIN)/python -m benchmarks.depth_scaling
	$(BIN)/python -m benchmarks.spikes_cost

bench-gpu:
	$(GPU_PYTHON) -m benchmarks.gpu --data-dir $(DATA)

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
