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

# requirements.lock pins every package (direct and transitive, with hashes) that the suite last passed with;
# requirements-runtime.lock is its subset that `batchd run` needs (what a production host installs,
# docs/running.md).
# `make lock` refreshes both with uv (pinned here; it lives in its own venv, never in the project's).
LOCK := requirements.lock
RUNTIME_LOCK := requirements-runtime.lock
LOCK_OPTIONS := --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock"
UV_VERSION ?= 0.13.10
TOOLS := .venv-tools
# `make lock` moves every pin to the newest release pyproject.toml allows; `make lock UPGRADE="--upgrade-package
# anthropic"` moves only that one (and what it needs); `make lock UPGRADE=` keeps the pins and adds what is new.
UPGRADE ?= --upgrade
LATEST_VENV ?= .venv-latest
OLDEST_VENV ?= .venv-oldest
# name==version with the name normalized as PyPI does (lower case, - for _ and .), sorted: for comm.
NORMALIZE := awk -F'==' '{n = tolower($$1); gsub(/[_.]/, "-", n); print n "==" $$2}' | sort

.PHONY: test test-nodb test-latest test-oldest lock dist demo lint typecheck pytest postgres chromium systemd nginx bench clean

# The venv is built anew from the lock whenever the lock or the project's metadata changes, so nothing left
# over from an earlier lock survives in it. The project itself goes in without its dependencies (the lock
# has them) and without build isolation (the locked setuptools builds it).
$(VENV)/.installed: pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

# The runtime lock is resolved within the full one, so a production host runs exactly the versions tested.
lock: $(TOOLS)/bin/uv
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra test --extra embedded $(UPGRADE) $(LOCK_OPTIONS) -o $(LOCK)
	$(TOOLS)/bin/uv pip compile pyproject.toml --constraint $(LOCK) $(LOCK_OPTIONS) -o $(RUNTIME_LOCK)

$(TOOLS)/bin/uv:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet uv==$(UV_VERSION)

# The suite against the newest release of every dependency, in a throwaway venv: drift shows up here, on
# purpose, before it reaches a fresh machine. Prints which packages differ from the lock; when it passes,
# `make lock` takes them.
test-latest: postgres chromium systemd nginx
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade -e '.[test,embedded]'
	@echo "Newer than the lock:"
	@grep -oE '^[A-Za-z0-9._-]+==[^ ;]+' $(LOCK) | $(NORMALIZE) > $(LATEST_VENV)/locked.txt
	@$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | $(NORMALIZE) | grep -v '^pip==' \
		| comm -13 $(LATEST_VENV)/locked.txt - | sed 's/^/  /'
	touch $(LATEST_VENV)/.installed  # the venv is ready: the targets below must not rebuild it from the lock
	$(MAKE) typecheck pytest VENV=$(LATEST_VENV)

# The suite against the lowest release of each direct dependency that pyproject.toml allows (their own
# dependencies as new as those allow): the lower bounds are claims, and this checks them. Only pytest: the
# oldest ruff and mypy allowed lint and type-check differently, which says nothing about batchd at run time.
test-oldest: $(TOOLS)/bin/uv postgres chromium systemd nginx
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra test --extra embedded --resolution lowest-direct \
		--python-version 3.11 --quiet -o $(OLDEST_VENV)/requirements.txt
	@echo "Resolved: $(OLDEST_VENV)/requirements.txt"
	$(OLDEST_VENV)/bin/python -m pip install --quiet -r $(OLDEST_VENV)/requirements.txt
	$(OLDEST_VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(OLDEST_VENV)/.installed
	$(MAKE) pytest VENV=$(OLDEST_VENV)

# The sdist and the wheel, in dist/ (the build backend is the locked setuptools: no build isolation).
dist: $(VENV)/.installed
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .

test: $(VENV)/.installed postgres lint typecheck pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

# The tests use $(DATABASE_URL) when it answers, else an embedded PostgreSQL in .batchd/pgdata.
pytest: $(VENV)/.installed postgres chromium systemd nginx
	BATCHD_TEST_DATABASE_URL=$$($(BIN)/python -m batchd.dev.embedded_pg ensure --url $(DATABASE_URL)) \
		$(BIN)/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The tests that need no PostgreSQL (marked nodb by tests/conftest.py from their fixtures): none is started.
test-nodb: $(VENV)/.installed chromium systemd
	$(BIN)/pytest -n $(PYTEST_WORKERS) -m nodb $(PYTEST_ARGS)

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

# What tests/test_deploy_steps.py runs deploy/README.md's steps with: nginx (the shipped snippet, in front of
# the daemon), curl and openssl (the guide's own commands) and Debian's python3-venv (the guide's first
# step), from Debian's packages the same way; a no-op once installed.
nginx:
	@missing=; \
	[ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v curl >/dev/null 2>&1 || missing="$$missing curl"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	if [ -x /usr/bin/python3 ] && ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; then \
		missing="$$missing python3-venv"; fi; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	else echo "missing:$$missing; installing them needs root (or sudo): run apt-get install$$missing as root" >&2; exit 1; fi; \
	echo "Installing Debian's$$missing for tests/test_deploy_steps.py"; \
	$$SUDO apt-get update && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing

# The demo's configuration is development's (the emulator, the local server), never the shipped batchd.toml,
# which is production's template and talks to the real API.
demo: $(VENV)/.installed
	$(BIN)/batchd --config batchd.dev.toml demo

bench: $(VENV)/.installed
	$(BIN)/python bench/emulator_scale.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(OLDEST_VENV) $(TOOLS) dist build .mypy_cache .pytest_cache .ruff_cache *.egg-info
