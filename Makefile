# Two commands set everything up on a fresh Linux machine with Python 3.12:
#   make train   create .venv, install requirements, build the offline assets, run train.py's default job
#   make test    the same set-up, then the test suite
PYTHON ?= python3.12
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup assets train test
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 12), "leanvla needs Python 3.12 (isaaclab 3.0)"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

assets: setup
	$(PY) -m envs.assets

train: assets
	$(PY) train.py ppo

test: assets
	$(PY) -m pytest -q
