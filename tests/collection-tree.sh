#!/usr/bin/env bash
# Lay the collection out as ansible_collections/bulkhead/microseg under DIR (what
# ansible-test and ANSIBLE_COLLECTIONS_PATH need), from the files of this checkout.
#   tests/collection-tree.sh DIR          copy (ansible-test sanity: only collection files)
#   tests/collection-tree.sh DIR --link   symlink to the checkout (units, integration)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:?usage: collection-tree.sh DIR [--link]}
dest="$dir/ansible_collections/bulkhead/microseg"
mkdir -p "$dir/ansible_collections/bulkhead"
rm -rf "$dest"
if [ "${2:-}" = "--link" ]; then
  ln -s "$root" "$dest"
  exit 0
fi
mkdir -p "$dest"
# Collection content only: not the Python distribution (agent/), tooling or test output.
for item in galaxy.yml meta plugins roles playbooks docs tests README.md LICENSE CHANGELOG.md changelogs \
            inventory-examples molecule requirements.txt bindep.txt .ansible-lint; do
  [ -e "$root/$item" ] && cp -a "$root/$item" "$dest/"
done
rm -rf "$dest/tests/output"
find "$dest" -name __pycache__ -type d -prune -exec rm -rf {} +
