# Two entry points on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv/ and install the project into it first (once).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch that lies on these machines' disk; on a GPU cluster use the Dockerfile,
# or `make install TORCH=torch` inside an environment that already has CUDA torch.
TORCH  ?= torch==2.13.0

.PHONY: install demo demo-roberta test test-fast clean-demo

$(BIN)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[test,zh]'
	touch $@

install: $(BIN)/.installed

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash tools/demo.sh

demo-roberta: install
	PATH="$(abspath $(BIN)):$$PATH" DEMO_MODEL=roberta bash tools/demo.sh

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not distributed"

clean-demo:
	rm -rf demo runs/roberta_demo* runs/deberta_v3_demo*
