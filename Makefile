# ebpf-net-exporter. Two commands on a fresh Debian 12 machine:
#   make setup   install everything (Debian packages, headers, tracefs, .venv, Python deps)
#   make test    run the whole test suite (kernel tests need root)
VENV := .venv
# checkov (tests/deploy) in its own environment: it pins dozens of packages the exporter's
# environment must not be bound by
CHECKOV_VENV := .venv-checkov
CHECKOV_VERSION := 3.3.30
PYTHON := $(VENV)/bin/python
# Debian's interpreter: python3-bpfcc lives in its dist-packages
SYSTEM_PYTHON := /usr/bin/python3
# root already (CI, these VMs): no sudo needed, and it may not be installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test unit lint demo run bench bench-long bench-pool bench-quick soak clean deploy-sync image-test

setup:
	sh scripts/setup-host.sh
	test -x $(PYTHON) || $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test]'
	$(PYTHON) -c 'import bcc, pyroute2, prometheus_client; print("setup: ok, bcc", bcc.__version__)'
	test -x $(CHECKOV_VENV)/bin/checkov || ($(SYSTEM_PYTHON) -m venv $(CHECKOV_VENV) && \
		$(CHECKOV_VENV)/bin/pip install -q 'checkov==$(CHECKOV_VERSION)')

test: lint
	$(PYTHON) -m pytest -q

unit:
	$(PYTHON) -m pytest -q tests/unit

lint:
	$(VENV)/bin/ruff check exporter lab tests benchmarks scripts

# deploy/base/generated/ from alerts/ and dashboards/ (tests/deploy fail when it is stale)
deploy-sync:
	$(PYTHON) scripts/sync_deploy.py

# builds deploy/Containerfile with buildah from a debootstrapped Debian and runs the exporter
# in it against a test node (minutes: not part of `make test`)
image-test:
	EBPF_NET_IMAGE_TEST=1 $(PYTHON) -m pytest -q tests/deploy/test_deploy_image.py

# A test node of namespaces and veths with real servers and a traffic loop, and the exporter
# attached to it (never to the host's own interfaces). Ctrl-C tears it all down.
demo:
	$(SUDO) $(PYTHON) -m lab.demo

# The performance benchmarks (issue 8): their own test node, about 14 minutes; prints the
# headline table and writes docs/benchmarks.md. Not part of `make test`.
bench:
	$(SUDO) $(PYTHON) -m benchmarks --out docs/benchmarks.md

# the same with the pairs that the throughput and connection-loop verdicts need on a machine
# as noisy as ours (about 20 minutes)
bench-long:
	$(SUDO) $(PYTHON) -m benchmarks --long --out docs/benchmarks-long.md

# The throughput and loop verdicts over every saved run of this datapath (benchmarks/pairs/);
# PAIRS=tcp=600 measures so many more pairs of a stream first (about 15 minutes for 600)
bench-pool:
	$(SUDO) $(PYTHON) -m benchmarks.pool $(if $(PAIRS),--run $(PAIRS))

# A smoke run of the same code: few rounds, small flow counts, prints only (under a minute).
bench-quick:
	$(SUDO) $(PYTHON) -m benchmarks --quick

# 10 minutes of churn with a scrape every second: RSS, scrape time, counters, map fill
# (benchmarks/soak.py; results in docs/benchmarks.md, "Soak")
soak:
	$(SUDO) $(PYTHON) -m benchmarks.soak --seconds 600

run:
	$(SUDO) $(VENV)/bin/ebpf-net-exporter

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) *.egg-info .pytest_cache .ruff_cache
