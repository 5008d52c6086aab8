#!/usr/bin/env bash
# Build the rt2_ros_interfaces messages with rosidl into a Python venv that holds ROS 2 from
# PyPI wheels (no system ROS). The venv root is the ROS prefix: messages install into
# <venv>/lib and <venv>/lib/pythonX.Y/site-packages, where the ros_wheels_bootstrapper
# (a .pth hook of the wheels) already puts <venv>/lib on LD_LIBRARY_PATH at interpreter start.
# Usage: tools/build_interfaces.sh <venv> [build-dir]
set -euo pipefail
venv=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
build=${2:-$here/build/rt2_ros_interfaces}
py=$venv/bin/python
mkdir -p "$build"
export AMENT_PREFIX_PATH=$venv CMAKE_PREFIX_PATH=$venv

# The wheels' rosidl_generator_py export files hard-code the include paths of the machine that
# built them (/opt/python/...); point them at this venv's Python and numpy headers.
"$py" "$here/tools/fix_rosidl_exports.py" "$venv"

cmake -S "$here/rt2_ros_interfaces" -B "$build" -Wno-dev \
  -DCMAKE_INSTALL_PREFIX="$venv" -DCMAKE_PREFIX_PATH="$venv" -DCMAKE_BUILD_TYPE=Release \
  -DPython3_EXECUTABLE="$py" -DPython3_FIND_VIRTUALENV=ONLY -DBUILD_TESTING=OFF >"$build/configure.log" 2>&1 \
  || { cat "$build/configure.log"; echo "rt2_ros_interfaces: cmake configure failed (log above)" >&2; exit 1; }
cmake --build "$build" -j "$(nproc)" >"$build/build.log" 2>&1 \
  || { tail -50 "$build/build.log"; echo "rt2_ros_interfaces: build failed (log: $build/build.log)" >&2; exit 1; }
cmake --install "$build" >"$build/install.log" 2>&1 \
  || { tail -20 "$build/install.log"; echo "rt2_ros_interfaces: install failed" >&2; exit 1; }
echo "rt2_ros_interfaces: built and installed into $venv"
