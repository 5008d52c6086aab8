#!/usr/bin/env bash
# Re-make requirements.txt (the full pinned lock) from requirements.in in a scratch venv.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.in"
# The ROS wheels install a second dist-info under the bare ROS name (e.g. rclpy beside ros-rclpy)
# that no index serves; keep only the installable ros-* name.
"$scratch/venv/bin/pip" freeze --disable-pip-version-check | python3 -c '
import re, sys
lines = [l.strip() for l in sys.stdin if l.strip() and not l.startswith("rt2")]
norm = lambda l: re.split("==", l)[0].lower().replace("_", "-")
names = {norm(l) for l in lines}
print("# Pinned lock of requirements.in, made by tools/lock_requirements.sh; do not edit by hand.")
print("\n".join(l for l in lines if "ros-" + norm(l) not in names))
' > "$here/requirements.txt"
echo "requirements.txt: $(grep -vc '^#' "$here/requirements.txt") pins"
