# Quick start: `make demo` (set-up + demo cohort + full study) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEMO := data/demo
DEMO_SUBJECTS ?= 64
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test test-quality test-cluster lint install clean real-scans report-screenshot

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# torch first, pinned, CPU build: a wheel already on disk (pip's find-links, no index asked), else
# PyTorch's CPU index; from PyPI (or an open-ended requirement) it would be the multi-GB CUDA build.
TORCH_INDEX ?= --index-url https://download.pytorch.org/whl/cpu
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install --quiet --upgrade pip
	if $(BIN)/pip install --quiet --dry-run --no-index --no-deps torch==2.13.0 2>/dev/null; \
	then $(BIN)/pip install --quiet torch==2.13.0; \
	else $(BIN)/pip install --quiet torch==2.13.0 $(TORCH_INDEX); fi
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

$(DEMO)/participants.tsv: | $(VENV)/.installed
	$(BIN)/python -m pipeline.demo $(DEMO) --n-subjects $(DEMO_SUBJECTS) --seed 0 --overwrite

demo: $(VENV)/.installed $(DEMO)/participants.tsv
	$(BIN)/snakemake --cores all --configfile config/config.yaml
	@echo "Report: $(abspath results/report.html)"

# Real whole-head T1w scans (two sessions of one person) from the npm package brainbrowser 2.3.0,
# AGPL-3.0: fetched with npm (or from the npm registry without it, checked against its SHA-1) into data/real/brainbrowser (ignored, never committed) beside their
# licence; pipeline.demo.realscans builds the real-anatomy QC cohort from them (tests/test_real_scans.py).
REAL_SCANS := data/real/brainbrowser
REAL_SCANS_URL := https://registry.npmjs.org/brainbrowser/-/brainbrowser-2.3.0.tgz
REAL_SCANS_SHA1 := 09a8e361956e997594d19e102b142ca5857e0937
$(REAL_SCANS)/structural2.mnc.raw.gz:
	rm -rf $(REAL_SCANS).tmp && mkdir -p $(REAL_SCANS).tmp
	cd $(REAL_SCANS).tmp && { if command -v npm >/dev/null; then npm pack --silent brainbrowser@2.3.0 >/dev/null; \
		else python3 -c "import urllib.request as u; u.urlretrieve('$(REAL_SCANS_URL)', 'brainbrowser-2.3.0.tgz')"; fi; } \
		&& echo "$(REAL_SCANS_SHA1)  brainbrowser-2.3.0.tgz" | sha1sum -c --quiet && tar -xzf brainbrowser-2.3.0.tgz \
		package/LICENSE package/package.json $(foreach s,structural1 structural2,package/examples/models/$(s).mnc.header.gz package/examples/models/$(s).mnc.raw.gz)
	mkdir -p $(REAL_SCANS)
	mv $(REAL_SCANS).tmp/package/examples/models/structural* $(REAL_SCANS).tmp/package/LICENSE $(REAL_SCANS).tmp/package/package.json $(REAL_SCANS)/
	rm -rf $(REAL_SCANS).tmp

real-scans: $(REAL_SCANS)/structural2.mnc.raw.gz

# The report at 1366 px (docs/report-1366.png) in headless Chromium (apt-get install chromium-headless-shell),
# after `make demo` (REPORT=path/to/report.html for another study); prints the page's laid-out width.
REPORT ?= results/report.html
report-screenshot: $(VENV)/.installed
	$(BIN)/python tests/browser.py $(REPORT) docs/report-1366.png

# Everything but the quality studies (test-quality) and the SLURM cluster test, which needs a running
# cluster (test-cluster); .ci/run runs all three. On TEST_WORKERS pytest-xdist workers
# (tests/conftest.py: one worker per module or shared study).
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(BIN)/python -m pytest -v -m "not cluster and not quality" --durations=20 -n $(TEST_WORKERS) --dist loadscope

# The studies that measure the method's quality goals: the focal-lesion cohort (ROC AUC, maps on the
# lesion) and the real scans' QC (after make real-scans; skipped without them). About 6 min on 2 cores.
test-quality: $(VENV)/.installed
	$(BIN)/python -m pytest -v -rs -m quality --durations=10 -n $(TEST_WORKERS) --dist loadscope

# As root on Debian: tests/cluster/slurm.sh up first (installs and starts a one-node SLURM).
test-cluster: $(VENV)/.installed
	PIPELINE_REQUIRE_SLURM=1 $(BIN)/python -m pytest -v -rs -s -m cluster tests/cluster

lint: $(VENV)/.installed
	$(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
