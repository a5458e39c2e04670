# The two commands of the README:
#   make run   - the whole local stack (Synapse + Enclave on SQLite + demo staff) in the foreground
#   make test  - install everything this project needs, then lint and run every test
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test install lint bench clean

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

clean:
	rm -rf $(VENV) var/local-stack
