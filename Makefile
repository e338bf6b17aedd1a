# All set-up happens here: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_DIR ?= models/demo

.PHONY: install test demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/branched build --out $(DEMO_DIR)
	$(BIN)/branched evaluate $(DEMO_DIR)
	$(BIN)/branched bench $(DEMO_DIR) --batch-size 64

clean:
	rm -rf $(VENV) archives/*.mar reports models
