"""Every shipped params file is valid: the main setup and each backend overlay on top of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from rt2_ros.backends import BACKENDS, backend_class
from rt2_ros.nodes.bringup import load_params_file
from rt2_ros.params import resolve
from rt2_ros.policy import POLICY_PARAMS, PolicyConfig
from rt2_ros.safety import SafetyConfig
from rt2_ros.tokens import TOKENIZER_PARAMS, ActionTokenizer

CONFIG = Path(__file__).resolve().parents[1] / "config"
OVERLAYS = sorted((CONFIG / "backends").glob("*.yaml"))


def test_every_backend_has_an_example():
    assert {p.stem for p in OVERLAYS} == set(BACKENDS)


@pytest.mark.parametrize("overlay", [None, *OVERLAYS], ids=lambda p: "rt2.yaml" if p is None else p.name)
def test_params_file_validates(overlay):
    layers = [load_params_file(CONFIG / "rt2.yaml")] + ([load_params_file(overlay)] if overlay else [])
    policy = {k: v for layer in layers for k, v in layer.get("rt2_policy", {}).items()}
    backend_type = policy["backend.type"]
    # Switching backends is one key: everything else in the file validates for any backend.
    options = backend_class(backend_type).OPTIONS
    resolve(POLICY_PARAMS + TOKENIZER_PARAMS + options, policy,
            allow_unknown_prefixes=tuple(f"backend.{t}." for t in BACKENDS if t != backend_type))
    PolicyConfig.from_params(policy)
    tokenizer_cfg = {k: v for k, v in policy.items() if k.startswith("tokenizer.")}
    if not tokenizer_cfg.get("tokenizer.dataset_statistics"):  # the example points at a robot's model dir
        ActionTokenizer.from_config(tokenizer_cfg)
    safety = {k: v for layer in layers for k, v in layer.get("rt2_safety", {}).items()}
    SafetyConfig.from_params({k: v for k, v in safety.items() if k.startswith("safety.")})
