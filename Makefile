# Bulkhead: `make test` sets up everything it needs (Debian packages, .venv) and runs
# every suite. Targets are safe to run again.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-down test deps lint typecheck unit conformance conformance-kernel conformance-windows collection-lint collection-sanity \
	kernel-and-checks collection-checks collection-test molecule bench clean wheelhouse

test: deps lint typecheck unit conformance conformance-windows kernel-and-checks collection-test

# The conformance cases in labs leave most of the 2 cores idle (much of their time goes
# to waiting for the probes that must time out): ansible-lint and ansible-test sanity,
# which keep about one core busy, run beside them. Each target's output is
# printed whole when it ends (--output-sync).
kernel-and-checks: deps
	$(MAKE) -j2 --output-sync=target conformance-kernel collection-checks

collection-checks: collection-lint collection-sanity

# The README's first command: an example inventory enforced on a lab of six hosts.
demo: deps
	$(BIN)/bulkhead demo --root "$(CURDIR)"

# Removes every namespace, process and file `make demo` made (the lab "demo").
demo-down:
	@if [ -x $(BIN)/bulkhead ]; then $(BIN)/bulkhead lab down --name demo; \
	else echo "nothing to remove: $(BIN)/bulkhead is not installed"; fi

deps: $(STAMP)

$(STAMP): scripts/bootstrap.sh agent/pyproject.toml tests/requirements.txt
	bash scripts/bootstrap.sh
	touch $@

lint: deps
	cd agent && ../$(BIN)/ruff check src tests benchmarks

# The second run checks the Windows-only half of the service against pywin32's stubs.
typecheck: deps
	cd agent && ../$(BIN)/mypy
	cd agent && ../$(BIN)/mypy --platform win32 --follow-imports=silent src/bulkhead/agent/win_service.py \
		src/bulkhead/agent/hcn.py src/bulkhead/agent/hns_enforcer.py src/bulkhead/agent/lock.py

# Two passes: the tests marked `alone` (namespaces, labs, nftables in the kernel, time and
# memory bounds: agent/tests/conftest.py) one at a time, then the others two at a time.
unit: deps
	cd agent && ../$(BIN)/pytest -m alone --durations=15 && ../$(BIN)/pytest -m "not alone" -n 2 --durations=15

conformance: deps
	$(BIN)/bulkhead conformance run agent/tests/conformance/

# The same cases on real agents enforcing nftables in a lab of network namespaces: two
# labs at once (conf, conf2), each taking the next case, so that one's wait for the
# probes that must time out overlaps the other's work.
conformance-kernel: deps
	$(BIN)/bulkhead conformance run agent/tests/conformance/ --dataplane nftables --at-once 2

# The same cases compiled for Windows (HNS ACLs) and decided by a fake of HNS: no Windows
# here, so this checks the compilation; cases HNS cannot enforce are reported as refused.
conformance-windows: deps
	$(BIN)/bulkhead conformance run agent/tests/conformance/ --dataplane hns
	$(BIN)/bulkhead conformance run agent/tests/conformance/ --dataplane windows-firewall

# The collection's own modules resolve through a link in $(VENV)/collections.
collection-lint: deps
	tests/collection-tree.sh $(VENV)/collections --link
	ANSIBLE_COLLECTIONS_PATH="$(CURDIR)/$(VENV)/collections" PATH="$(CURDIR)/$(BIN):$$PATH" \
	  $(BIN)/ansible-lint --profile production --offline

# ansible-test sanity on a copy laid out as ansible_collections/bulkhead/microseg.
collection-sanity: deps
	VENV="$(CURDIR)/$(VENV)" tests/run-sanity.sh

# Collection unit tests, then playbooks and inventories against a real bulkhead-server.
collection-test: deps
	VENV="$(CURDIR)/$(VENV)" tests/run-collection-tests.sh

# Only the Molecule scenarios (molecule/*/) on lab machines; `make test` runs them in
# collection-test (tests/integration/test_molecule.py).
molecule: deps
	VENV="$(CURDIR)/$(VENV)" tests/run-molecule.sh

# Wheels for hosts with no package index (the roles' *_install_from: wheel, docs/roles.md):
# the bulkhead-microseg wheel built from agent/ and every runtime dependency as a wheel.
# By default for this machine's Python and platform; for other hosts, for example:
#   make wheelhouse WHEELHOUSE_TARGET="--python-version 3.11 --platform manylinux2014_x86_64"
WHEELHOUSE := build/wheelhouse
WHEELHOUSE_TARGET :=
wheelhouse: deps
	rm -rf $(WHEELHOUSE)
	mkdir -p $(WHEELHOUSE)
	$(BIN)/pip wheel -q --no-deps --no-build-isolation --wheel-dir $(WHEELHOUSE) ./agent
	$(BIN)/pip download -q --dest $(WHEELHOUSE) --only-binary=:all: $(WHEELHOUSE_TARGET) \
	  $(WHEELHOUSE)/bulkhead_microseg-*.whl
	@ls $(WHEELHOUSE)

bench: deps
	$(BIN)/python agent/benchmarks/run.py

clean:
	rm -rf $(VENV) build agent/src/*.egg-info tests/output .pytest_cache agent/.pytest_cache
