#!/usr/bin/env bash
# Unit and integration tests of the collection, with pytest: the collection is linked
# into a temporary ansible_collections/ tree on ANSIBLE_COLLECTIONS_PATH; the
# integration tests start a real bulkhead-server on 127.0.0.1 and run ansible-playbook
# and ansible-inventory against it.
#   tests/run-collection-tests.sh [PYTEST ARGS]
# By default tests/unit and tests/integration, two test files at a time (pytest-xdist,
# a file's tests on one worker, so a module's fixtures are made once): the Molecule
# scenarios (test_molecule.py, about eight minutes) run beside the other files.
# The files go to the workers in the order given here, not xdist's default (the files
# with the most tests first), which put the Molecule scenarios and the pki role's runs,
# five tests each, one after the other on one worker while the other sat idle for
# minutes. The unit tests first (seconds; and tests/integration/conftest.py, loaded
# last, is the `conftest` its files import), then the three longest files, each worker
# taking the next file when it is almost done (Molecule, then the pki role;
# test_roles.py, then the rest).
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
if [ $# -eq 0 ]; then
  longest=(tests/integration/test_molecule.py tests/integration/test_roles.py
           tests/integration/test_roles_pki.py)
  mapfile -t units < <(find tests/unit -name 'test_*.py' | sort)
  set -- -n 2 --dist loadfile --no-loadscope-reorder "${units[@]}" "${longest[@]}"
  while IFS= read -r f; do
    case " ${longest[*]} " in *" $f "*) ;; *) set -- "$@" "$f" ;; esac
  done < <(find tests/integration -name 'test_*.py' | sort)
fi
# not exec: the EXIT trap above removes $work when pytest is done
"$venv/bin/pytest" -p no:cacheprovider -q --durations=10 -c tests/pytest.ini "$@"
