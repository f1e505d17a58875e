# The README's two set-up commands, `make demo` and `make test`: each installs what it
# needs first. The Python packages (the latest from PyPI) go into a virtual environment,
# .venv: Debian's own python3 refuses pip installs into the system (PEP 668).
SYSTEM_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL = $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	apt-get install -y -qq --no-install-recommends

.PHONY: demo test deps lint bench node-example

demo: deps
	$(PYTHON) -m engine.cli demo

test: deps
	$(PYTHON) -m pytest -q

lint: deps
	$(VENV)/bin/ruff check engine tests bench conf/examples
	$(VENV)/bin/mypy engine

bench: deps
	$(PYTHON) -m pip install -q -r bench/requirements.txt
	$(PYTHON) -m bench.run

deps: $(VENV)/.installed

# The Node.js producer example's one package, zeromq (prebuilt binaries inside), from its
# package-lock.json into conf/examples/node/node_modules (not committed);
# tests/engine/test_examples.py runs the example when it is there.
node-example:
	@command -v npm >/dev/null || { $(APT_INSTALL) nodejs npm; }
	cd conf/examples/node && npm ci --ignore-scripts --no-audit --no-fund

# Debian's python3 makes a venv only with python3-venv installed.
$(PYTHON):
	$(SYSTEM_PYTHON) -m venv $(VENV) || { rm -rf $(VENV) && $(APT_INSTALL) python3-venv \
		&& $(SYSTEM_PYTHON) -m venv $(VENV); }

# Again whenever setup.py changes.
$(VENV)/.installed: setup.py | $(PYTHON)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $@
