# Two commands from a fresh clone (each re-runnable; the environment is made once):
#   make demo   a virtual environment in .venv, then the offline demo: a tree drawn five ways and a
#               4-step training run of a tiny random model (seconds)
#   make test   the same environment, then the fast tests (tiny random models, offline)
# torch comes as its CPU build unless nvidia-smi finds a CUDA GPU (the CUDA build is ~3 GB).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: demo test
demo: $(VENV)/.installed
	$(PYTHON) -m pictures.tree_text
	$(PYTHON) train_gsm8k.py --smoke

test: $(VENV)/.installed
	$(PYTHON) -m pytest -q

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	if nvidia-smi >/dev/null 2>&1; then $(PYTHON) -m pip install -q $(TORCH); \
	else $(PYTHON) -m pip install -q $(TORCH) --index-url https://download.pytorch.org/whl/cpu; fi
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@
