"""clean_text: outside text made safe for ROS messages and log lines; the policy core applies it."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from rt2_ros.policy import ReplyOutcome
from rt2_ros.text import clean_text


def test_lone_surrogate_becomes_valid_utf8():
    out = clean_text("ok \ud800 done")
    out.encode("utf-8")  # would raise on a surrogate
    assert out == "ok ? done"


def test_control_characters_are_blanked_but_tab_and_newline_kept():
    assert clean_text("a\x1b[31mred\x07\tb\nc\x00") == "a [31mred \tb\nc "


def test_credentials_are_masked():
    text = ("connect to https://robot:hunter2@gpu.example:8443/act?api_key=SECRET1&x=1 failed; "
            "header Authorization: Bearer abcdefgh12345678 and Api-Key zyxwvuts98765432")
    out = clean_text(text)
    for secret in ("hunter2", "SECRET1", "abcdefgh12345678", "zyxwvuts98765432"):
        assert secret not in out
    assert "https://***@gpu.example:8443/act?api_key=***&x=1" in out


def test_length_is_bounded():
    out = clean_text("x" * 10_000_000, limit=200)
    assert len(out) == 200 and out.endswith("…")


@given(st.text())
def test_any_text_comes_out_encodable_and_bounded(text):
    out = clean_text(text, limit=100)
    out.encode("utf-8")
    assert len(out) <= 100


def test_reply_outcome_cleans_what_a_backend_sent():
    out = ReplyOutcome(1, False, "invalid_tokens", "bad \udcff detail", plan="p\ud800", text="t" * 5000,
                       latency_s=math.nan, backend="x\x00")
    for field in (out.detail, out.plan, out.text, out.backend):
        field.encode("utf-8")
    assert len(out.text) <= 1000 and out.backend == "x "
