# `make demo`: install, train a plain and a residual net briefly on Fashion-MNIST (CPU), run the diagnostics.
# `make test`: install and run the test suite.   `make bench`: the performance benchmarks.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision first, pinned, so that pip takes the builds this project is tested with.
TORCH := torch==2.14.1 torchvision==0.29.1
DATA ?= data
DEMO ?= demo
DEMO_ARGS := --dataset fashion-mnist --data-dir $(DATA) --train-images 8000 --epochs 3 --batch-size 128 --lr 0.1

.PHONY: install test demo bench fashion-mnist clean

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
	$(BIN)/python -m diagnostics.demo $(DEMO)/plain20 $(DEMO)/resnet20 --data-dir $(DATA) --out $(DEMO)/diagnostics

bench: install
	$(BIN)/python -m benchmarks.train_throughput
	$(BIN)/python -m benchmarks.analysis_overhead
	$(BIN)/python -m benchmarks.depth_scaling
	$(BIN)/python -m benchmarks.spikes_cost

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
