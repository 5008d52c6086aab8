"""Every shipped params file is valid: the main setup and each backend overlay on top of it.

Valid means what ``rt2-bringup --check`` says (rt2_ros.nodes.bringup.check_params), which is the
nodes' own check (test/test_config_check.py compares the two on the real nodes).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rt2_ros.backends import BACKENDS

pytest.importorskip("rclpy")  # the check reads the node modules' ParamSpecs

from rt2_ros.nodes.bringup import check_params

CONFIG = Path(__file__).resolve().parents[1] / "config"
OVERLAYS = sorted((CONFIG / "backends").glob("*.yaml"))
# Overlays named for a ready setup rather than a backend, and the backend each one uses.
SETUPS = {"learned": "local"}  # the repo-trained checkpoint (models/rt2-tiny) through the local backend


def test_every_backend_has_an_example():
    assert {p.stem for p in OVERLAYS} == set(BACKENDS) | set(SETUPS)


@pytest.mark.parametrize("overlay", [None, *OVERLAYS], ids=lambda p: "rt2.yaml" if p is None else p.name)
def test_params_file_validates(overlay):
    paths = [CONFIG / "rt2.yaml"] + ([overlay] if overlay else [])
    checked = check_params(paths)
    # Switching backends is one key: everything else in the file validates for any backend.
    assert set(checked.nodes) == {"rt2_policy", "rt2_safety", "rt2_sim"}
    assert checked.nodes["rt2_policy"]["backend.type"] == (SETUPS.get(overlay.stem, overlay.stem) if overlay
                                                           else "embedded")
    # Only a robot's model files may be missing here (the local example points at /opt/models/...).
    assert all("not on this machine" in n for n in checked.notes), checked.notes
