#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine (as root) for `make test`: the Debian packages the
# suites use, then the project's virtualenv with the bulkhead package and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# Debian packages: installed only when missing, so repeated runs stay fast and offline.
APT_PACKAGES=(python3 python3-venv python3-dev gcc git make etcd-server iproute2 nftables conntrack procps systemd util-linux openssl)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  echo "bootstrap: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# The distribution was called `bulkhead` before it became bulkhead-microseg (the name
# `bulkhead` on the package index is someone else's): drop the old editable install.
if "$VENV/bin/python" -m pip show -q bulkhead >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip uninstall -q -y bulkhead
fi
# clickhouse and flows-test: the flow store's ClickHouse backend and the embedded engine
# (chdb) its tests run on. --no-compile: Python compiles a module when it is first imported
# (and keeps it in __pycache__); compiling every file at install, most of them never
# imported here (about 21,000 files, 15,000 of them the `ansible` package's collections), took
# half the install's time (69 s against 37 s with a warm pip cache).
"$VENV/bin/python" -m pip install -q --no-compile -e "agent[dev,clickhouse,flows-test]" \
  -r tests/requirements.txt
