#!/usr/bin/env bash
# Molecule scenarios (molecule/*/molecule.yml) on lab machines, one `molecule test` each:
# the collection is linked into a temporary ansible_collections/ tree, and Molecule's and
# Ansible's state (ephemeral dirs, inventories, ansible.cfg) lives in that temporary dir,
# removed on exit. A scenario's labs are removed by its destroy step, also when a step
# fails; if Molecule itself dies, `molecule destroy` runs here once more.
#   tests/run-molecule.sh [SCENARIO...]     (default: every scenario under molecule/)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
work=$(mktemp -d "${TMPDIR:-/tmp}/bulkhead-molecule.XXXXXX")
current=""

finish() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -n "$current" ]; then
    echo "run-molecule: scenario $current failed ($rc): molecule destroy" >&2
    MOLECULE_EPHEMERAL_DIRECTORY="$work/ephemeral/$current" \
      molecule --base-config molecule/config.yml destroy -s "$current" || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$root/tests/collection-tree.sh" "$work/collections" --link
export ANSIBLE_COLLECTIONS_PATH="$work/collections" ANSIBLE_HOME="$work/home"
export BULKHEAD_CLI="$venv/bin/bulkhead"
# The roles' scenarios install bulkhead from wheels (lab machines have no package index):
# $BULKHEAD_WHEELHOUSE if given (a directory made by `make wheelhouse`), else built here.
if [ -z "${BULKHEAD_WHEELHOUSE:-}" ]; then
  make -s -C "$root" wheelhouse VENV="$venv" WHEELHOUSE="$work/wheelhouse" >/dev/null
  export BULKHEAD_WHEELHOUSE="$work/wheelhouse"
fi
# molecule/ at the collection's root (not extensions/molecule/): said once, here
export MOLECULE_GLOB="molecule/*/molecule.yml"
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 NO_COLOR=1
export PATH="$venv/bin:$PATH"
unset ANSIBLE_PYTHON_INTERPRETER ANSIBLE_CONFIG
cd "$root"

if [ $# -eq 0 ]; then
  for f in molecule/*/molecule.yml; do
    set -- "$@" "$(basename "$(dirname "$f")")"
  done
fi
for scenario in "$@"; do
  [ -f "molecule/$scenario/molecule.yml" ] || { echo "no scenario molecule/$scenario" >&2; exit 2; }
done
for scenario in "$@"; do
  current=$scenario
  echo "run-molecule: molecule test -s $scenario"
  MOLECULE_EPHEMERAL_DIRECTORY="$work/ephemeral/$scenario" \
    molecule --base-config molecule/config.yml test -s "$scenario"
done
current=""
