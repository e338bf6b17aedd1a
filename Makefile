# All set-up happens here: `make test` and `make demo` work on a fresh clone, offline.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_DIR ?= models/demo
# Extra `branched build` options, e.g. the heavier model whose compute dominates serving overhead:
#   make demo DEMO_DIR=models/demo18 DEMO_BUILD_ARGS="--backbone cifar_resnet18 --exits 3 --spacing even --epochs 2 --exit-epochs 4"
DEMO_BUILD_ARGS ?=
# Load-test settings of the demo (override: make demo USERS=16 DURATION=60s).
USERS    ?= 8
DURATION ?= 30s
# Ray Serve pays several ms of CPU per handle call; more concurrent users give the stages bigger batches.
RAY_USERS ?= 32
RAY_BATCH_ARGS ?= --batch-size 32 --max-batch-delay 20

# The compute-heavy case: a 224-px resnet50 with random weights (BN statistics from CIFAR-10 images) and its
# exit mix fixed by quantile thresholds; the model, not the server, dominates a request.
HEAVY_DIR  ?= models/heavy
HEAVY_DATA ?= ../shared/data/cifar10
HEAVY_MODEL_ARGS ?= --backbone resnet50 --input-size 224 --dataset imagefolder --data-root $(HEAVY_DATA) --threads 1
HEAVY_DURATION ?= 60s

.PHONY: install test test-fast demo demo-ray demo-model demo-heavy demo-heavy-model clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The core, build and adapter unit tests only: nothing that starts TorchServe, Ray or Locust.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not server"

# Build the demo model once (reused by later runs); then show its accuracy/cost and the bench.
demo-model: $(STAMP)
	@if [ -f $(DEMO_DIR)/config.json ]; then echo "[demo] reusing $(DEMO_DIR) (rm -r it to rebuild)"; \
	 else echo "[demo] building $(DEMO_DIR) on the bundled dataset"; $(BIN)/branched build --out $(DEMO_DIR) $(DEMO_BUILD_ARGS); fi
	@echo "[demo] evaluate on the test split"
	$(BIN)/branched evaluate $(DEMO_DIR)
	@echo "[demo] bench: plain backbone against routed model, batch 64, one process, one thread (steadier on a shared machine)"
	$(BIN)/branched bench $(DEMO_DIR) --batch-size 64 --threads 1

# The main job: model -> .mar archives -> TorchServe -> Locust (early-exit, then baseline) -> report.
demo: demo-model
	@echo "[demo] archive for TorchServe"
	$(BIN)/branched archive $(DEMO_DIR) --out archives
	@echo "[demo] load test on TorchServe: $(USERS) users x $(DURATION) per model"
	$(BIN)/branched loadtest --server torchserve --model-dir $(DEMO_DIR) --out reports/torchserve \
		--users $(USERS) --duration $(DURATION)

demo-ray: demo-model
	@echo "[demo] load test on Ray Serve: $(RAY_USERS) users x $(DURATION) per model"
	$(BIN)/branched loadtest --server ray --model-dir $(DEMO_DIR) --out reports/ray \
		--users $(RAY_USERS) --duration $(DURATION) $(RAY_BATCH_ARGS)

demo-heavy-model: $(STAMP)
	@if [ -f $(HEAVY_DIR)/config.json ]; then echo "[demo] reusing $(HEAVY_DIR) (rm -r it to rebuild)"; \
	 else echo "[demo] building $(HEAVY_DIR): random weights, fixed exit mix"; \
	 $(BIN)/branched random-model --out $(HEAVY_DIR) $(HEAVY_MODEL_ARGS); fi

# Both servers on the compute-heavy model, one after the other.
demo-heavy: demo-heavy-model
	@echo "[demo] load test on TorchServe: $(USERS) users x $(HEAVY_DURATION) per model"
	$(BIN)/branched loadtest --server torchserve --model-dir $(HEAVY_DIR) --out reports/heavy-torchserve \
		--users $(USERS) --duration $(HEAVY_DURATION)
	@echo "[demo] load test on Ray Serve: $(USERS) users x $(HEAVY_DURATION) per model"
	$(BIN)/branched loadtest --server ray --model-dir $(HEAVY_DIR) --out reports/heavy-ray \
		--users $(USERS) --duration $(HEAVY_DURATION) --ray-env RAY_health_check_failure_threshold=30

clean:
	rm -rf $(VENV) archives/*.mar reports models
