# ebpf-net-exporter. Two commands on a fresh Debian 12 machine:
#   make setup   install everything (Debian packages, headers, tracefs, .venv, Python deps)
#   make test    run the whole test suite (kernel tests need root)
VENV := .venv
PYTHON := $(VENV)/bin/python
# Debian's interpreter: python3-bpfcc lives in its dist-packages
SYSTEM_PYTHON := /usr/bin/python3
# root already (CI, these VMs): no sudo needed, and it may not be installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test unit lint demo run clean soak

setup:
	sh scripts/setup-host.sh
	test -x $(PYTHON) || $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test]'
	$(PYTHON) -c 'import bcc, pyroute2, prometheus_client; print("setup: ok, bcc", bcc.__version__)'

test: lint
	$(PYTHON) -m pytest -q

unit:
	$(PYTHON) -m pytest -q tests/unit

lint:
	$(VENV)/bin/ruff check exporter tests benchmarks

# A test node of namespaces and veths with real servers and a traffic loop, and the exporter
# attached to it (never to the host's own interfaces). Ctrl-C tears it all down.
demo:
	$(SUDO) $(PYTHON) -m tests.demo

# 10 minutes of churn with a scrape every second: RSS, scrape time, counters, map fill
# (benchmarks/soak.py; results in docs/benchmarks.md, "Soak")
soak:
	$(SUDO) $(PYTHON) -m benchmarks.soak --seconds 600

run:
	$(SUDO) $(VENV)/bin/ebpf-net-exporter

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
