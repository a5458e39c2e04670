# The two commands of the README:
#   make run   - the whole local stack (Synapse + Enclave on SQLite + demo staff) in the foreground
#   make test  - install everything this project needs, then lint and run every test
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test install lint bench bench-compare clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml deploy/local/pyproject.toml deploy/install.sh \
		tests/e2ee_client/package-lock.json
	bash deploy/install.sh $(VENV)
	touch $@

run: install
	$(PY) -m devstack.stack $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: install lint
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: install
	$(PY) bench/ingest.py

# issue 18's "no regression": ingest and gate latency, base revision against HEAD, interleaved
# (BASE=<rev> to change the base; ~8 min each)
COMPARE_BENCHES ?= ingest gate_latency
bench-compare: install
	for b in $(COMPARE_BENCHES); do \
		$(PY) bench/compare.py $$b $(if $(BASE),--base $(BASE)) $(ARGS) || exit 1; done

clean:
	rm -rf $(VENV) var/local-stack
