# The two set-up commands of the README. Each installs what it needs first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: demo test deps lint bench

deps:
	@command -v openssl >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl)
	$(PIP) install -q -e '.[test]'

demo: deps
	$(PYTHON) -m engine.cli demo

test: deps
	$(PYTHON) -m pytest -q

lint: deps
	ruff check engine tests bench
	mypy engine

bench: deps
	$(PIP) install -q -r bench/requirements.txt
	$(PYTHON) -m bench.run
