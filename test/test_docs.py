"""Docs that are generated from code must match the code."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_parameter_reference_is_current():
    pytest.importorskip("rclpy")  # node modules declare parameters next to their rclpy code
    from rt2_ros.params_doc import render

    current = (REPO / "docs" / "parameters.md").read_text()
    assert current == render(), "docs/parameters.md is stale: run `.venv/bin/python -m rt2_ros.params_doc > " \
                                "docs/parameters.md`"


def test_readme_starts_with_the_two_commands():
    head = "\n".join((REPO / "README.md").read_text().splitlines()[:30])
    assert "make demo" in head and "make test" in head


def test_readme_safety_table_is_current():
    from rt2_ros.params import markdown_table
    from rt2_ros.safety import SAFETY_PARAMS

    assert markdown_table(SAFETY_PARAMS) in (REPO / "README.md").read_text(), \
        "README's safety parameter table is stale: paste markdown_table(SAFETY_PARAMS)"
