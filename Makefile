# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs into .venv first.
# The dev/CI install pins every package through constraints.txt (torch==2.13.0 resolves to the CPU build on
# disk here and to the same release on a GPU machine); the library itself only declares ranges.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MIP := $(VENV)/bin/mip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)

DEMO_DIR ?= demo_out
TEST_WORKERS ?= 2  # pytest-xdist processes for `make test` (one per core of the CI machine)
DEMO_PROFILES ?= 100
DEMO_ARCH ?= qwen2_5_vl
DEMO_MINUTES ?= 25
export MIP_THREADS ?= 1
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

.PHONY: install test test-fast browser demo demo-method serve bench bench-compare bench-selectivity bench-scale bench-probes bench-gold bench-nightly gpu-check clean

install: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(MAKE) --no-print-directory browser || echo "warning: no chromium here; the Prefect UI browser test will skip"
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=30

# Debian's Chromium and ChromeDriver, for the browser test of the Prefect UI (tests/integration/test_prefect_ui.py).
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); export DEBIAN_FRONTEND=noninteractive; \
	  $$sudo apt-get install -y -q chromium chromium-driver >/dev/null || \
	  { $$sudo apt-get update -q >/dev/null && $$sudo apt-get install -y -q chromium chromium-driver >/dev/null; }; }

test-fast: install
	$(PY) -m pytest -m "not slow"

# ---- demo: benchmark -> vanilla model (cached) -> evaluation table
$(DEMO_DIR)/bench/manifest.json: | install
	$(MIP) benchmark make --out $(DEMO_DIR)/bench --profiles $(DEMO_PROFILES) --seed 0

$(DEMO_DIR)/vanilla/model.safetensors: $(DEMO_DIR)/bench/manifest.json
	$(MIP) vanilla --bench $(DEMO_DIR)/bench --arch $(DEMO_ARCH) --size demo --minutes $(DEMO_MINUTES) \
		--out $(DEMO_DIR)/vanilla

# The service end to end on the embedded default: a fresh local store under $(DEMO_DIR)/store; the demo model
# registered as `demo` v0001 with plain keep-set files (other people's facts, general questions, the question
# templates it was trained on: exported from its benchmark, which the service then never opens); three forget
# requests queued (three people named by name and photo, and one unknown id, which is rejected with its reason);
# then the nightly flow (local Prefect, local Ray, a 2-rank DeepSpeed job) and its report.
DEMO_ROOT ?= $(DEMO_DIR)/store
# gloo and Ray on loopback only (by default Ray binds every interface and gloo picks the first one)
LOCAL_ONLY = GLOO_SOCKET_IFNAME=lo RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
DEMO_PREFECT = PREFECT_HOME=$(CURDIR)/$(DEMO_DIR)/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
	PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180 $(LOCAL_ONLY)
demo: install $(DEMO_DIR)/vanilla/model.safetensors
	rm -rf $(DEMO_ROOT)
	$(MIP) benchmark export --bench $(DEMO_DIR)/bench --out $(DEMO_DIR)/keepsets
	$(MIP) models register --root $(DEMO_ROOT) --name demo --model $(DEMO_DIR)/vanilla \
		--retain $(DEMO_DIR)/keepsets/retain.jsonl --utility $(DEMO_DIR)/keepsets/utility.jsonl \
		--templates $(DEMO_DIR)/keepsets/templates.jsonl
	for f in examples/requests/*.json; do $(MIP) submit $$f --root $(DEMO_ROOT) || exit 1; done
	$(DEMO_PREFECT) MIP_ROOT=$(DEMO_ROOT) MIP_NO_BENCHMARK=1 $(PY) -m flows.service
	@latest=$$(ls -t $(DEMO_ROOT)/batches/*/report.html | head -1); echo; \
	echo "HTML report with figures: file://$(CURDIR)/$$latest"; \
	echo "(mip report $$(basename $$(dirname $$latest)) --root $(DEMO_ROOT) --open prints it again)"

# The method-level demo of issues 2-4: evaluation of the vanilla model, one `mip unlearn`, its evaluation.
demo-method: install $(DEMO_DIR)/vanilla/model.safetensors
	$(MIP) eval --model $(DEMO_DIR)/vanilla --bench $(DEMO_DIR)/bench --forget 10 \
		--json $(DEMO_DIR)/vanilla_eval.json
	$(MIP) unlearn --model $(DEMO_DIR)/vanilla --bench $(DEMO_DIR)/bench --forget 10 --method mip \
		--out $(DEMO_DIR)/mip10
	$(MIP) eval --model $(DEMO_DIR)/mip10 --bench $(DEMO_DIR)/bench --forget 10 \
		--reference $(DEMO_DIR)/vanilla_eval.json --json $(DEMO_DIR)/mip10_eval.json

# A local Prefect server (UI on http://127.0.0.1:4200), the `mip-process` work pool, every deployment of
# prefect.yaml, and a worker in the foreground (Ctrl-C stops worker and server). Runs use $(SERVE_ROOT).
SERVE_HOME ?= $(CURDIR)/$(DEMO_DIR)/prefect-server
SERVE_ROOT ?= $(CURDIR)/$(DEMO_ROOT)
SERVE_ENV = PREFECT_HOME=$(SERVE_HOME) PREFECT_API_URL=http://127.0.0.1:4200/api PREFECT_SERVER_ANALYTICS_ENABLED=false
serve: install
	mkdir -p $(SERVE_HOME)
	$(SERVE_ENV) $(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200 > $(SERVE_HOME)/server.log 2>&1 & \
	server=$$!; MIP_ROOT=$(SERVE_ROOT) $(MIP) report --serve > $(SERVE_HOME)/reports.log 2>&1 & \
	reports=$$!; trap "kill $$server $$reports 2>/dev/null || true" EXIT INT TERM; \
	for i in $$(seq 120); do $(PY) -c "import urllib.request as u; u.urlopen('http://127.0.0.1:4200/api/health', timeout=2)" \
		2>/dev/null && break; sleep 1; done; \
	$(SERVE_ENV) $(VENV)/bin/prefect work-pool create mip-process --type process --overwrite && \
	$(SERVE_ENV) $(VENV)/bin/prefect --no-prompt deploy --all && \
	echo "Prefect UI: http://127.0.0.1:4200  (server log: $(SERVE_HOME)/server.log); batch reports: http://127.0.0.1:8765" && \
	$(SERVE_ENV) MIP_REPO_DIR=$(CURDIR) MIP_ROOT=$(SERVE_ROOT) $(LOCAL_ONLY) $(VENV)/bin/prefect worker start --pool mip-process

# Attribution speed and completeness per quadrature rule against the research code's algorithm
# (benches/research_ref.py), and storage: BENCHMARKS.md section 2, benches/results/attribution.json (about 12 min
# on 2 cores). Never asserted in tests. Uses the demo's model when `make demo` has run, else a random model of the
# same size (speed only: the completeness figures need the trained model).
bench: install
	$(PY) benches/attribution_bench.py --model $(DEMO_DIR)/vanilla --bench $(DEMO_DIR)/bench
	@if [ -f $(DEMO_DIR)/vanilla/training_log.json ]; then \
		$(PY) benches/training_curve.py $(DEMO_DIR)/vanilla/training_log.json; \
	else echo "no $(DEMO_DIR)/vanilla/training_log.json: run make demo for the learning curve"; fi

# The method comparison of BENCHMARKS.md section 3 (about 50 min on 2 cores; needs the demo's vanilla model).
bench-compare: install $(DEMO_DIR)/vanilla/model.safetensors
	$(MIP) compare --model $(DEMO_DIR)/vanilla --bench $(DEMO_DIR)/bench --forget 5 --methods all --seeds 3 \
		--json benches/results/compare05.json --plot benches/results/compare05.png
	for pct in 10 15; do $(MIP) compare --model $(DEMO_DIR)/vanilla --bench $(DEMO_DIR)/bench --forget $$pct \
		--methods all --json benches/results/compare$$pct.json --plot benches/results/compare$$pct.png; done

# The selectivity study of BENCHMARKS.md section 5: mip against its random-neuron control, full-model RMisU and
# the paper's settings, on 5 forget subsets, at two model scales (the demo model and `scale2`, 5.2 M parameters,
# trained once and cached). About 2 h 30 min on 2 cores (one thread each), most of it scale2's training and runs.
SELECTIVITY_METHODS ?= mip,random,rmu,mip_paper
SELECTIVITY_SUBSETS ?= 5
$(DEMO_DIR)/scale2_vanilla/model.safetensors: $(DEMO_DIR)/bench/manifest.json
	$(MIP) vanilla --bench $(DEMO_DIR)/bench --arch $(DEMO_ARCH) --size scale2 --minutes 60 \
		--out $(DEMO_DIR)/scale2_vanilla

bench-selectivity: install $(DEMO_DIR)/vanilla/model.safetensors $(DEMO_DIR)/scale2_vanilla/model.safetensors
	for scale in vanilla scale2_vanilla; do $(MIP) compare --model $(DEMO_DIR)/$$scale --bench $(DEMO_DIR)/bench \
		--forget 5 --methods $(SELECTIVITY_METHODS) --seeds $(SELECTIVITY_SUBSETS) \
		--json benches/results/selectivity_$$scale.json --plot benches/results/selectivity_$$scale.png; done
	$(PY) benches/selectivity_table.py demo=benches/results/selectivity_vanilla.json \
		scale2=benches/results/selectivity_scale2_vanilla.json

# Memory, bytes moved and wall time per stage (attribution, the DeepSpeed edit at 1 and 2 ranks, publication) of
# random bf16 Qwen2.5-VL models of 0.1 / 0.5 / 1.5 B parameters, and the extrapolation to 72B on 8 x 80 GB nodes
# (BENCHMARKS.md section 7, benches/results/scale.json). About 40 min on 2 cores; SCALE_ARGS="--sizes smoke"
# runs the same code on a 3 M-parameter model in about 5 min.
SCALE_ARGS ?=
# Requests that name people by name and photo (the service builds its probes, the benchmark is never opened)
# against requests naming the same people's benchmark ids, scored on the benchmark (BENCHMARKS.md section 8).
bench-probes: install $(DEMO_DIR)/vanilla/model.safetensors
	$(DEMO_PREFECT) $(PY) benches/probe_bench.py --model $(DEMO_DIR)/vanilla --bench $(DEMO_DIR)/bench --people 5 \
		--out benches/results/probes.json --work $(DEMO_DIR)/probe_bench
	$(PY) benches/probe_consistency.py --model $(DEMO_DIR)/vanilla --bench $(DEMO_DIR)/bench \
		--out benches/results/probe_consistency.json

# Exact unlearning as the yardstick (issue 19): on a benchmark other than the demo's (seed 7, 60 people), a vanilla
# model and, per forget subset (10 %: 6 people; subsets 0-2), a gold model trained by the same recipe without
# them; then mip, its random-neuron control and full-model RMU at today's defaults, measured against both
# (benches/results/gold_default.json; BENCHMARKS.md section 9, whose first tables, gold.json, are an older
# default). Fixed step counts, so a loaded machine trains the same models, only slower; about 65 min on 2 cores.
GOLD_DIR ?= $(DEMO_DIR)/gold_bench
GOLD_TRAIN = --arch $(DEMO_ARCH) --size demo --steps 5000 --minutes 120
bench-gold: install
	test -f $(GOLD_DIR)/bench/manifest.json || $(MIP) benchmark make --out $(GOLD_DIR)/bench --profiles 60 --seed 7
	test -f $(GOLD_DIR)/vanilla/training_log.json || \
		$(MIP) vanilla --bench $(GOLD_DIR)/bench $(GOLD_TRAIN) --out $(GOLD_DIR)/vanilla
	for k in 0 1 2; do test -f $(GOLD_DIR)/gold$$k/training_log.json || $(MIP) vanilla --bench $(GOLD_DIR)/bench \
		$(GOLD_TRAIN) --exclude-forget 10 --forget-seed $$k --out $(GOLD_DIR)/gold$$k || exit 1; done
	$(MIP) compare --model $(GOLD_DIR)/vanilla --bench $(GOLD_DIR)/bench --forget 10 --methods mip,random,rmu \
		--seeds 3 --gold $(GOLD_DIR)/gold0 $(GOLD_DIR)/gold1 $(GOLD_DIR)/gold2 \
		--json benches/results/gold_default.json --plot benches/results/gold_default.png

# Nights of one-person requests through the service on the demo model, against a gold model trained by the same
# recipe without every person the scenarios name (issue 19; BENCHMARKS.md section 10, benches/results/nightly.json):
# one night of 16 and of 32 requests, the same work as one batch, random neurons instead of paths, and five
# consecutive nights of 4. In-process edits; about 60 min on 2 cores with the gold model cached (+12 min to train it).
NIGHTLY_PEOPLE_SEED ?= 1
$(DEMO_DIR)/nightly_gold/model.safetensors: $(DEMO_DIR)/vanilla/model.safetensors
	$(MIP) vanilla --bench $(DEMO_DIR)/bench --arch $(DEMO_ARCH) --size demo --steps 7000 --minutes 120 \
		--exclude $$($(PY) benches/nightly_bench.py --print-people --bench $(DEMO_DIR)/bench \
		--people-seed $(NIGHTLY_PEOPLE_SEED)) --out $(DEMO_DIR)/nightly_gold

bench-nightly: install $(DEMO_DIR)/vanilla/model.safetensors $(DEMO_DIR)/nightly_gold/model.safetensors
	$(DEMO_PREFECT) $(PY) benches/nightly_bench.py --model $(DEMO_DIR)/vanilla --bench $(DEMO_DIR)/bench \
		--gold $(DEMO_DIR)/nightly_gold --people-seed $(NIGHTLY_PEOPLE_SEED) --work $(DEMO_DIR)/nightly_bench \
		--out benches/results/nightly.json

bench-scale: install
	$(LOCAL_ONLY) $(PY) benches/scale_bench.py $(SCALE_ARGS)

# On a machine with one GPU: a Qwen2.5-VL-7B-shaped random bf16 model through attribution, a ZeRO-3 edit step
# over NCCL, the gate and a sharded publish (one JSON line of figures), then the CUDA tests (pytest -m gpu).
# At most about 8 minutes, nothing downloaded. GPU_CHECK_ARGS=--dry-run runs the same path on CPU, tiny shape.
GPU_CHECK_ARGS ?=
gpu-check: install
	env -u DS_ACCELERATOR $(PY) benches/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
