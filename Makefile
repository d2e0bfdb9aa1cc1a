# Two commands do all the set-up on a fresh machine:
#   make demo   -> creates .venv, installs m3ae, pre-trains a tiny M3AE on built-in data (runs/demo)
#   make test   -> creates .venv, installs m3ae with test extras, runs the test suite
PYTHON ?= python3
TORCH_INDEX ?=
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned to the releases this project is tested with. The default wheel
	# carries CUDA (several GB); on a machine without a GPU use the CPU build:
	#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/m3ae demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py --config bench-cpu

clean:
	rm -rf $(VENV) runs .pytest_cache
