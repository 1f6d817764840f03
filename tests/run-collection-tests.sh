#!/usr/bin/env bash
# Unit and integration tests of the collection, with pytest: the collection is linked
# into a temporary ansible_collections/ tree on ANSIBLE_COLLECTIONS_PATH; the
# integration tests start a real bulkhead-server on 127.0.0.1 and run ansible-playbook
# and ansible-inventory against it.
#   tests/run-collection-tests.sh [PYTEST ARGS]
# By default tests/unit and tests/integration, two test files at a time (pytest-xdist,
# a file's tests on one worker, so a module's fixtures are made once): the Molecule
# scenarios (test_molecule.py, about seven minutes) run beside the other files.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
work=$(mktemp -d "${TMPDIR:-/tmp}/bulkhead-collection.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$root/tests/collection-tree.sh" "$work" --link
export BULKHEAD_COLLECTIONS_PATH="$work" BULKHEAD_ANSIBLE_HOME="$work/home"
export ANSIBLE_COLLECTIONS_PATH="$work" ANSIBLE_HOME="$work/home"
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$venv/bin:$PATH"
cd "$work/ansible_collections/bulkhead/microseg"
[ $# -gt 0 ] || set -- -n 2 --dist loadfile tests/unit tests/integration
# not exec: the EXIT trap above removes $work when pytest is done
"$venv/bin/pytest" -p no:cacheprovider -q --durations=10 -c tests/pytest.ini "$@"
