# batchd developer entry points. Both quick-start commands set themselves up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PG_HOST ?= 127.0.0.1
PG_PORT ?= 5432
DATABASE_URL ?= postgresql://postgres@$(PG_HOST):$(PG_PORT)/postgres
# The tests mostly wait (on daemons, emulated batches, subprocesses): three at once on two cores halve the
# wall time. PYTEST_WORKERS=0 runs them in this one process.
PYTEST_WORKERS ?= 3

.PHONY: test demo lint typecheck pytest postgres chromium systemd bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's metadata changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,embedded]'
	touch $@

test: $(VENV)/.installed postgres lint typecheck pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

# The tests use $(DATABASE_URL) when it answers, else an embedded PostgreSQL in .batchd/pgdata.
pytest: $(VENV)/.installed postgres chromium systemd
	BATCHD_TEST_DATABASE_URL=$$($(BIN)/python -m batchd.embedded_pg ensure --url $(DATABASE_URL)) \
		$(BIN)/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# Start the machine's local cluster when it is installed but stopped; with none, the embedded one serves.
postgres:
	@if pg_isready -q -h $(PG_HOST) -p $(PG_PORT) 2>/dev/null; then exit 0; fi; \
	if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then \
		echo "PostgreSQL is not answering on $(PG_HOST):$(PG_PORT); starting the local cluster"; \
		pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | sort -V | tail -n 1) main start; \
		for i in $$(seq 1 30); do pg_isready -q -h $(PG_HOST) -p $(PG_PORT) && exit 0; sleep 1; done; \
	fi; \
	echo "No PostgreSQL on $(PG_HOST):$(PG_PORT): the tests will use an embedded one"

# Headless Chromium for the browser tests (tests/browser.py), from Debian's packages; a no-op once installed.
chromium:
	@if [ -x /usr/bin/chromium ]; then exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	else echo "chromium is missing and installing it needs root (or sudo): run apt-get install chromium as root" >&2; exit 1; fi; \
	echo "Installing Debian's chromium for the browser tests"; \
	$$SUDO apt-get update && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

# systemd-analyze for tests/test_deploy.py (`systemd-analyze verify` of deploy/*.service), from Debian's
# systemd package the same way; the tests fail, not skip, without it.
systemd:
	@if command -v systemd-analyze >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	else echo "systemd-analyze is missing and installing it needs root (or sudo): run apt-get install systemd as root" >&2; exit 1; fi; \
	echo "Installing Debian's systemd for systemd-analyze (tests/test_deploy.py)"; \
	$$SUDO apt-get update && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd

demo: $(VENV)/.installed
	$(BIN)/batchd demo

bench: $(VENV)/.installed
	$(BIN)/python bench/emulator_scale.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache *.egg-info
