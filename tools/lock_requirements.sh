#!/usr/bin/env bash
# Re-make requirements.txt (the full pinned lock) from requirements.in in a scratch venv.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.in"
{ echo "# Pinned lock of requirements.in, made by tools/lock_requirements.sh; do not edit by hand."
  "$scratch/venv/bin/pip" freeze --disable-pip-version-check | grep -v '^rt2.ros'; } > "$here/requirements.txt"
echo "requirements.txt: $(grep -vc '^#' "$here/requirements.txt") pins"
