# rt2_ros: one-command setup, demo and tests on a machine with Python 3.10–3.13 and a C compiler.
#   make demo   set everything up, then run the simulated pick-and-place episode
#   make test   set everything up, then lint and run the whole test suite
# Both are idempotent: a second run only redoes steps whose inputs changed (stamps in .stamps/).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMPS := .stamps
SOURCES := $(shell find rt2_ros scripts launch config models -type f \( -name '*.py' -o -name '*.yaml' -o -name '*.proto' -o -name '*.json' -o -path 'scripts/*' -o -path 'models/*' \) 2>/dev/null) setup.py setup.cfg package.xml

.PHONY: setup setup-test demo test lint clean distclean collect train-learned eval-learned demo-learned bench

setup: $(STAMPS)/installed
setup-test: $(STAMPS)/installed $(STAMPS)/local-extra $(STAMPS)/fleet-extra

$(STAMPS)/venv:
	@mkdir -p $(STAMPS)
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 10) <= v <= (3, 13) else f"rt2_ros needs Python 3.10-3.13, {sys.executable} is {v[0]}.{v[1]}; run: make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	@touch $@

# Pinned dependencies: ROS 2 Kilted from PyPI wheels + the libraries of the pure core.
$(STAMPS)/requirements: requirements.txt $(STAMPS)/venv
	$(PIP) install -q -r requirements.txt
	@touch $@

# Custom messages, built for real with rosidl/cmake into the venv (the venv root is the ROS prefix).
$(STAMPS)/interfaces: $(STAMPS)/requirements tools/build_interfaces.sh tools/fix_rosidl_exports.py \
		rt2_ros_interfaces/CMakeLists.txt rt2_ros_interfaces/package.xml $(wildcard rt2_ros_interfaces/msg/*.msg) \
		$(wildcard rt2_ros_interfaces/action/*.action)
	tools/build_interfaces.sh $(VENV)
	@touch $@

# The package itself, non-editable, so that share/ament_index and lib/rt2_ros exist for ros2 launch.
$(STAMPS)/installed: $(STAMPS)/interfaces $(SOURCES)
	$(PY) -m rt2_ros.grpc_codegen
	$(PIP) install -q --no-deps --no-build-isolation .
	@touch $@

# Optional extra for the `local` backend (torch CPU + transformers); the tests use it.
$(STAMPS)/local-extra: requirements-local.txt $(STAMPS)/requirements
	$(PIP) install -q -r requirements-local.txt
	@touch $@

# Optional extra for fleet serving on Ray Serve (rt2-fleet-serve); the tests use it, `make demo` does not.
$(STAMPS)/fleet-extra: requirements-fleet.txt $(STAMPS)/local-extra
	$(PIP) install -q -r requirements-fleet.txt
	@touch $@

lint: $(STAMPS)/requirements
	$(VENV)/bin/ruff check rt2_ros test tools launch bench

demo: setup
	$(VENV)/bin/rt2-demo

# pytest exit code 5 means "no tests collected": a broken suite, never a pass.
test: setup-test lint
	@$(PY) -m pytest -q -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests - failing" >&2; exit 1; fi; exit $$rc

# The RT-2 recipe (README "A learned policy, trained here"): demonstrations -> LeRobot dataset -> rt2-train.
# Demonstrations: the reference policy in randomised scenes (seeds 0..399), half of them perturbed, 128 px.
data/rt2-sim: | setup
	$(VENV)/bin/rt2-collect --out data/rt2-sim --episodes 400 --seed 0 --processes 2 --image-size 128
collect: data/rt2-sim

# Reproduces the shipped checkpoint models/rt2-tiny from the data and seed 0 (one torch thread, ~77 min here):
# 128 px images in 32 px patches, 16 image tokens per camera.
train-learned: setup-test data/rt2-sim
	$(VENV)/bin/rt2-train --data data/rt2-sim --out models/rt2-tiny --image-size 128 --patch-size 32 --epochs 20 \
		--val-fraction 0.05 --seed 0

# Held-out closed-loop success (ROS-free on 50 seeds, 5 of them through the nodes) next to the reference, GIFs.
eval-learned: setup-test
	$(VENV)/bin/rt2-eval --episodes 50 --nodes 5 --out bench/results/learned_eval

demo-learned: setup-test
	$(VENV)/bin/rt2-demo --policy learned --scene-seed 1000000

# Benchmarks (README "Performance"): transports and codecs, control under backend latency and the demo rate,
# fleet serving; each prints Markdown tables and writes them with the machine to bench/results/ (< 10 min).
bench: setup-test
	$(PY) bench/transport.py
	$(PY) bench/overhead.py
	$(PY) bench/control.py
	$(PY) bench/fleet.py
	@echo "== make bench: targets (bench/results/*.md)"
	@grep -HE '\*\*(met|not met)\*\*' bench/results/transport.md bench/results/overhead.md bench/results/fleet.md 2>/dev/null || true
	@grep -HE '^\| h[0-9]+ ' bench/results/control.md || true
	@ls -1 bench/results/transport.* bench/results/overhead.* bench/results/control.* bench/results/demo_rate.* bench/results/fleet.*

clean:
	rm -rf build $(STAMPS) *.egg-info rt2_ros/backends/proto/*_pb2*.py

distclean: clean
	rm -rf $(VENV)
