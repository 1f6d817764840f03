#!/usr/bin/env bash
# ansible-test sanity on a copy of the collection laid out as ansible_collections/...,
# offline except for PyPI: ansible-test's pip bootstrap is replaced by ensurepip.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
work=${BULKHEAD_SANITY_DIR:-${TMPDIR:-/tmp}/bulkhead-sanity}

# ansible-test downloads get-pip.py from ci-files.testing.ansible.com, which is not
# reachable here. A cached "get_pip" is used as is: this one bootstraps pip from the
# interpreter's own wheel (ensurepip), then installs what ansible-test asked for.
cache=~/.ansible/test/cache
mkdir -p "$cache"
cat > "$cache/get_pip_24_2.py" <<'PY'
"""Offline stand-in for get-pip.py: ensurepip, then pip install the requested packages."""
import subprocess
import sys

CA = "/etc/ssl/certs/ca-certificates.crt"
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"])
subprocess.check_call([sys.executable, "-m", "pip", "install", "--cert", CA] + args)
PY

"$root/tests/collection-tree.sh" "$work"
cd "$work/ansible_collections/bulkhead/microseg"
PATH="$venv/bin:$PATH" ansible-test sanity --python 3.11 --venv --color no "$@"
