"""Tests for constrained decoding (rt2_ros.constrained) and the ``local`` transformers backend.

The grammar tests at the top need only numpy + hypothesis. The model tests build tiny
random-weight models offline (test/tiny_models.py) and skip with a reason when torch or
transformers is not installed (``pip install -r requirements-local.txt``).
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rt2_ros.actions import Observation
from rt2_ros.backends import BackendConfigError, BackendError, BackendTimeout, create_backend
from rt2_ros.constrained import (
    GrammarError,
    GrammarLogitsProcessor,
    GrammarStoppingCriteria,
    IdGrammar,
    TextGrammar,
    id_grammar,
    text_grammar,
    valid_bins_per_dim,
    vocab_surfaces,
)
from rt2_ros.tokens import ActionTokenizer, TokenError

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROFILES = ("rt2", "rt1", "openvla")
EOS = -1  # stand-in end-of-sequence id for grammar walks without a model


@functools.cache
def _tokenizer(profile: str, **kw) -> ActionTokenizer:
    return ActionTokenizer.from_profile(profile, **kw)


@functools.cache
def _valid_bins(profile: str) -> tuple[np.ndarray, ...]:
    return valid_bins_per_dim(_tokenizer(profile))


# Synthetic vocabularies (id -> surface text), covering how real tokenizers spell numbers.
def _vocab(style: str) -> dict[int, str]:
    pieces = [str(d) for d in range(10)]
    if style == "split":  # LLaMA / Qwen: one digit per token, space on its own
        pieces += [" "]
    elif style == "multi":  # GPT-2 / SentencePiece: whole numbers, some with a leading space
        pieces += [" "] + [str(v) for v in range(0, 256, 7)] + [f" {v}" for v in range(0, 300, 3)]
    elif style == "no_lone_space":  # spaces only as a prefix of a number token
        pieces += [f" {d}" for d in range(10)]
    elif style == "spanning":  # tokens that cross a separator
        pieces += [" ", "5 1", "0 ", " 0 1", "1 1 1", "25", "55 "]
    else:
        raise ValueError(style)
    junk = ["a", "-1", "1.5", "\n", "", " x", "Action:", "0x", "١"]  # never allowed
    return dict(enumerate(pieces + junk))


VOCAB_STYLES = ("split", "multi", "no_lone_space", "spanning")


@functools.cache
def _text_grammar(profile: str, style: str) -> TextGrammar:
    return TextGrammar(_valid_bins(profile), _vocab(style))


def _walk(grammar, draw_index) -> list[int]:
    """Follow the grammar, picking among allowed tokens (+ EOS where it may end) with ``draw_index``."""
    state, out = grammar.start(), []
    while True:
        options = grammar.allowed(state).tolist() + ([EOS] if grammar.accepts(state) else [])
        assert options, "a reachable state must allow something"
        pick = options[draw_index(len(options))]
        if pick == EOS:
            return out
        out.append(pick)
        state = grammar.advance(state, pick)
        assert state is not None
        assert len(out) <= grammar.max_tokens
        if grammar.is_complete(state):
            return out


# ---------------------------------------------------------------------------------------------
# Grammar logic (torch-free)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILES)
def test_valid_bins_per_dim_follow_the_profile(profile):
    tok = _tokenizer(profile)
    valid = _valid_bins(profile)
    assert len(valid) == tok.n_dims
    for dim, bins in enumerate(valid):
        if tok.has_terminate and dim == 0:
            assert set(bins.tolist()) == {tok.terminate_bin, tok.continue_bin}
        else:
            assert bins.tolist() == list(range(tok.n_bins))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("style", VOCAB_STYLES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_text_walk_parses(profile, style, data):
    tok = _tokenizer(profile)
    grammar = _text_grammar(profile, style)
    surfaces = _vocab(style)
    ids = _walk(grammar, lambda n: data.draw(st.integers(0, n - 1)))
    text = "".join(surfaces[i] for i in ids)
    parsed = tok.parse_text(text)  # raises TokenError if the grammar let junk through
    assert re.fullmatch(tok.text_regex(), text.strip())
    assert tok.decode(parsed.bins).is_finite()


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("style", VOCAB_STYLES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_valid_answer_is_reachable(profile, style, data):
    """The grammar is not stricter than the tokenizer: any valid answer can be spelled char by char."""
    tok = _tokenizer(profile)
    bins = [data.draw(st.sampled_from(v.tolist())) for v in _valid_bins(profile)]
    text = tok.format_text(bins)
    grammar = _text_grammar(profile, style)
    by_text = {}
    for tid, s in _vocab(style).items():
        by_text.setdefault(s, tid)
    state = grammar.start()
    i = 0
    while i < len(text):  # greedy: take the longest vocabulary piece that keeps the answer valid
        for length in range(len(text) - i, 0, -1):
            tid = by_text.get(text[i:i + length])
            if tid is not None and grammar.advance(state, tid) is not None:
                state, i = grammar.advance(state, tid), i + length
                break
        else:
            pytest.fail(f"{text!r} cannot be continued at char {i} with style {style}")
    assert grammar.accepts(state)


@pytest.mark.parametrize("text,expect", [
    ("2 0 0 0 0 0 0 0", "dead"),  # terminate is a class: 0 or 1 only
    ("1 256 0 0 0 0 0 0", "dead"),  # beyond the last bin
    ("1 01 0 0 0 0 0 0", "dead"),  # leading zero: not canonical
    ("1  0", "dead"),  # double space
    ("0 0 0 0 0 0 0 0 0", "dead"),  # a ninth number
    ("1 0 0 0 0 0 0 0 ", "dead"),  # trailing separator
    ("1,0", "dead"),
    ("  1", "dead"),  # only one leading space is tolerated
    (" 1", "incomplete"),
    ("1 0 0 0 0 0 0", "incomplete"),
    (" 1 0 0 0 0 0 0 0", "accepted"),
])
def test_text_grammar_decides_prefixes(text, expect):
    char_id = {ch: i for i, ch in enumerate("0123456789 ,")}
    grammar = TextGrammar(_valid_bins("rt2"), {i: ch for ch, i in char_id.items()})
    state = grammar.walk(char_id[ch] for ch in text)
    got = "dead" if state is None else ("accepted" if grammar.accepts(state) else "incomplete")
    assert got == expect


def test_text_grammar_needs_a_vocabulary_that_can_spell_actions():
    with pytest.raises(GrammarError, match="cannot spell"):
        TextGrammar(_valid_bins("rt2"), {i: str(d) for i, d in enumerate("0123456789")})  # no space at all
    with pytest.raises(GrammarError, match="cannot spell"):
        TextGrammar(_valid_bins("rt2"), {0: "1", 1: "0", 2: " 999"})  # a separator only before a too-big number
    # ...while a sparse vocabulary that *can* spell an answer is accepted, and only offers what leads there:
    sparse = TextGrammar(_valid_bins("rt2"), {0: "1", 1: "0", 2: " 99", 3: " 999"})
    assert sparse.allowed(sparse.walk([0])).tolist() == [2]


def test_text_grammar_max_tokens_bounds_single_char_answers():
    tok = _tokenizer("rt2")
    grammar = _text_grammar("rt2", "split")
    longest = " " + tok.format_text([tok.terminate_bin] + [tok.n_bins - 1] * (tok.n_dims - 1))
    assert grammar.max_tokens == len(longest)


@pytest.mark.parametrize("profile,kw", [("openvla", {"token_form": "ids", "vocab_size": 1000}),
                                        ("rt2", {"token_form": "ids", "vocab_size": 300}),
                                        ("rt1", {"token_form": "ids", "vocab_size": 32000})])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_every_id_walk_decodes(profile, kw, data):
    tok = _tokenizer(profile, **kw)
    grammar = _id_grammar_cached(profile, tuple(sorted(kw.items())))
    ids = _walk(grammar, lambda n: data.draw(st.integers(0, n - 1)))
    assert len(ids) == tok.n_dims == grammar.max_tokens
    bins = tok.bins_from_ids(ids)
    assert tok.decode(bins).is_finite()
    if tok.has_terminate:  # the terminate position only offers the two class ids
        assert set(grammar.allowed(0).tolist()) == {int(tok.ids_from_bins(
            np.r_[b, np.zeros(tok.n_dims - 1, dtype=np.int64)])[0]) for b in (tok.terminate_bin, tok.continue_bin)}


@functools.cache
def _id_grammar_cached(profile: str, kw: tuple) -> IdGrammar:
    return id_grammar(_tokenizer(profile, **dict(kw)))


def test_id_grammar_honours_an_explicit_least_used_map():
    rng = np.random.default_rng(7)
    table = rng.choice(np.arange(1000, 5000), size=256, replace=False).tolist()
    tok = ActionTokenizer.from_profile("rt2", token_form="ids", token_ids=table)
    grammar = id_grammar(tok, vocab_size=5000)
    for pos in range(1, tok.n_dims):
        assert set(grammar.allowed(pos).tolist()) == set(table)
    with pytest.raises(GrammarError, match=r"tokenizer\.vocab_size"):
        id_grammar(tok, vocab_size=4000)


def test_id_grammar_rejects_wrong_ids_and_length():
    grammar = IdGrammar([[5, 6], [7], [8, 9]])
    assert grammar.walk([5, 7, 9]) == 3 and grammar.accepts(3) and grammar.is_complete(3)
    assert grammar.walk([7]) is None
    assert grammar.walk([5, 7, 9, 8]) is None
    with pytest.raises(GrammarError):
        IdGrammar([[1], []])


# ---------------------------------------------------------------------------------------------
# Logits processor with torch tensors, no model: arbitrary logits still give valid answers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["text", "ids"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_processor_makes_any_logits_valid(form, seed):
    torch = pytest.importorskip("torch", reason="torch not installed: pip install -r requirements-local.txt")
    vocab = 600  # text ids are < 200 (synthetic vocabulary), action ids 344..599, EOS apart from both
    eos = 300
    tok = _tokenizer("rt2", token_form=form, vocab_size=vocab)
    surfaces = _vocab("multi")
    grammar = _text_grammar("rt2", "multi") if form == "text" else _id_grammar_cached(
        "rt2", tuple(sorted({"token_form": form, "vocab_size": vocab}.items())))
    proc = GrammarLogitsProcessor(grammar, prompt_length=3, eos_token_id=eos)
    stop = GrammarStoppingCriteria(grammar, prompt_length=3, eos_token_id=eos)
    gen = torch.Generator().manual_seed(seed)
    seq = torch.tensor([[11, 12, 13]])
    for _ in range(grammar.max_tokens + 1):
        scores = torch.randn((1, vocab), generator=gen) * 30
        scores[0, torch.randint(0, vocab, (100,), generator=gen)] = float("-inf")  # e.g. suppressed tokens
        scores[0, torch.randint(0, vocab, (10,), generator=gen)] = float("nan")
        nxt = int(proc(seq, scores).argmax(dim=-1))
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        if nxt == eos or bool(stop(seq, None)[0]):
            break
    new = [t for t in seq[0, 3:].tolist() if t != eos]
    if form == "text":
        bins = tok.parse_text("".join(surfaces[i] for i in new)).bins
    else:
        bins = tok.bins_from_ids(new)
    assert tok.decode(bins).is_finite()


# ---------------------------------------------------------------------------------------------
# Tiny random-weight models through the real backend
# ---------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2)
ARCHS = ("llava", "causal_lm")


@pytest.fixture(scope="module")
def tiny():
    """factory(arch, style, seed) -> model directory, built once per module (offline, random weights)."""
    pytest.importorskip("torch", reason="torch not installed: pip install -r requirements-local.txt")
    pytest.importorskip("transformers", reason="transformers not installed: pip install -r requirements-local.txt")
    import tempfile

    import tiny_models

    root = Path(tempfile.mkdtemp(prefix="rt2_tiny_models_"))
    built: dict[tuple[str, str, int], str] = {}

    def factory(arch: str, style: str = "numbers", seed: int = 0) -> str:
        key = (arch, style, seed)
        if key not in built:
            build = tiny_models.build_tiny_llava if arch == "llava" else tiny_models.build_tiny_causal_lm
            built[key] = str(build(root / f"{arch}_{style}_{seed}", seed=seed, tokenizer_style=style))
        return built[key]

    factory.vocab_size = tiny_models.VOCAB_SIZE
    factory.eos_id = tiny_models.EOS_ID
    yield factory
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def _observations(n: int, seed: int) -> list[Observation]:
    rng = np.random.default_rng(seed)
    tasks = ["pick up the red block", "put the cube in the tray", "open the drawer"]
    return [Observation(rng.integers(0, 256, (int(rng.integers(24, 80)), int(rng.integers(24, 80)), 3),
                                     dtype=np.uint8), tasks[i % len(tasks)], seq=i, stamp=float(i))
            for i in range(n)]


def _decode(tok: ActionTokenizer, reply):
    """bins for a reply (parse_text / bins_from_ids), or raise TokenError."""
    if tok.token_form == "ids":
        assert reply.text is None and reply.token_ids is not None
        return tok.bins_from_ids(reply.token_ids)
    assert reply.token_ids is None and reply.text is not None
    return tok.parse_text(reply.text).bins


# (profile, token_form, tokenizer style, extra tokenizer options)
CASES = [
    ("rt2", "text", "numbers", {}),
    ("rt2", "text", "digits", {}),
    ("rt1", "text", "digits", {}),
    ("openvla", "ids", "numbers", {}),
    ("rt2", "ids", "digits", {"token_ids": "least_used"}),
]


def _case_tokenizer(profile: str, form: str, extra: dict, vocab_size: int) -> ActionTokenizer:
    kw = dict(extra)
    if kw.get("token_ids") == "least_used":  # PaLM-E style: an arbitrary table of rarely used ids
        kw["token_ids"] = np.random.default_rng(3).choice(np.arange(5, vocab_size), 256, replace=False).tolist()
    return ActionTokenizer.from_profile(profile, token_form=form, vocab_size=vocab_size, **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("profile,form,style,extra", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_constrained_output_is_always_a_valid_action(tiny, arch, profile, form, style, extra):
    tok = _case_tokenizer(profile, form, extra, tiny.vocab_size)
    answers = set()
    for seed in SEEDS:
        backend = create_backend("local", {"model_path": tiny(arch, style, seed), "device": "cpu"}, tok)
        assert backend.token_form == form
        assert backend.model_kind == ("image_text_to_text" if arch == "llava" else "causal_lm")
        for obs in _observations(3, seed):
            reply = backend.infer(obs, timeout_s=30.0)
            assert reply.seq == obs.seq and reply.backend == "local"
            bins = _decode(tok, reply)  # never raises: that is the point
            action = tok.decode(bins, reply.seq)
            assert action.is_finite() and action.observation_seq == obs.seq
            assert len(reply.token_ids or ()) <= backend.max_new_tokens
            answers.add(reply.text or reply.token_ids)
        backend.close()
    assert len(answers) > 1, "answers should depend on the (random) weights"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("profile,form,style,extra", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_batched_generate_answers_each_row_as_alone(tiny, arch, profile, form, style, extra):
    """infer_batch runs one generate over left-padded prompts of different lengths; each row's greedy,
    constrained answer equals the one infer() gives it alone, and a bad row fails alone."""
    tok = _case_tokenizer(profile, form, extra, tiny.vocab_size)
    backend = create_backend("local", {"model_path": tiny(arch, style, 1), "device": "cpu"}, tok)
    rng = np.random.default_rng(7)
    tasks = ["open the drawer", "stack the green cup on the plate and then push the blue button twice", "",
             "pick up the red block", "put the cube in the tray"]
    batch = [Observation(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), task, seq=10 + i, stamp=float(i))
             for i, task in enumerate(tasks)]
    generates = []
    original = backend._model.generate
    backend._model.generate = lambda **kw: generates.append(kw["input_ids"].shape) or original(**kw)
    try:
        results = backend.infer_batch(batch, timeout_s=60.0)
        assert generates == [generates[0]] and generates[0][0] == 4, generates  # one generate, 4 good rows
        alone = [backend.infer(obs, timeout_s=30.0) if obs.instruction else None for obs in batch]
    finally:
        backend._model.generate = original
        backend.close()
    assert isinstance(results[2], BackendError) and "prompt" in str(results[2])  # the empty instruction, alone
    for obs, got, expect in zip(batch, results, alone, strict=True):
        if expect is None:
            continue
        assert got.seq == obs.seq and (got.text, got.token_ids) == (expect.text, expect.token_ids), obs.instruction
        assert tok.decode(_decode(tok, got), got.seq).is_finite()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("profile,form,style", [("rt2", "text", "numbers"), ("openvla", "ids", "numbers")])
def test_without_the_grammar_random_weights_answer_junk(tiny, arch, profile, form, style):
    """The control experiment: the same models, unconstrained, produce invalid answers (the test can fail)."""
    tok = _case_tokenizer(profile, form, {}, tiny.vocab_size)
    invalid = []
    for seed in SEEDS:
        backend = create_backend("local", {"model_path": tiny(arch, style, seed), "device": "cpu",
                                           "constrained": False}, tok)
        reply = backend.infer(_observations(1, seed)[0], timeout_s=30.0)
        try:
            _decode(tok, reply)
        except TokenError as exc:
            invalid.append(exc.reason)
        backend.close()
    assert len(invalid) == len(SEEDS), f"unconstrained random models answered valid actions: {invalid}"


def test_hf_tokenizer_surfaces_match_decoding(tiny):
    """vocab_surfaces measures what decode produces: the tokenizer's own encoding of any valid answer
    walks the grammar to acceptance, for whole-number and split-digit vocabularies alike."""
    from transformers import AutoTokenizer

    tok = _tokenizer("rt2")
    rng = np.random.default_rng(0)
    for style in ("numbers", "digits"):
        hf = AutoTokenizer.from_pretrained(tiny("causal_lm", style, 0), local_files_only=True)
        surfaces = vocab_surfaces(hf)
        multi_digit = [s for s in surfaces.values() if sum(c.isdigit() for c in s) > 1]
        assert bool(multi_digit) == (style == "numbers")
        grammar = text_grammar(tok, surfaces)
        for _ in range(50):
            bins = [int(rng.choice(v)) for v in _valid_bins("rt2")]
            text = tok.format_text(bins)
            ids = hf(text, add_special_tokens=False)["input_ids"]
            state = grammar.walk(ids)
            assert state is not None and grammar.accepts(state), (style, text, hf.convert_ids_to_tokens(ids))
            assert hf.decode(ids, clean_up_tokenization_spaces=False).strip() == text


def test_generation_stops_at_the_grammar(tiny):
    """Id form: exactly n_dims new tokens (the forced-EOS step is skipped by the stopping criterion)."""
    tok = _case_tokenizer("openvla", "ids", {}, tiny.vocab_size)
    backend = create_backend("local", {"model_path": tiny("llava"), "device": "cpu"}, tok)
    assert backend.max_new_tokens == tok.n_dims
    reply = backend.infer(_observations(1, 0)[0], timeout_s=30.0)
    assert len(reply.token_ids) == tok.n_dims


def test_append_token_ids_and_prompt_template(tiny):
    tok = _tokenizer("rt2")
    backend = create_backend("local", {"model_path": tiny("llava"), "device": "cpu", "append_token_ids": [7, 8],
                                       "prompt_template": "{image}USER: {prompt}"}, tok)
    inputs = backend._model_inputs([backend._prompt_and_images(_observations(1, 0)[0])])
    assert inputs["input_ids"][0, -2:].tolist() == [7, 8]
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape
    tok.parse_text(backend.infer(_observations(1, 0)[0], 30.0).text)
    with pytest.raises(BackendConfigError, match=r"backend\.local\.prompt_template"):
        create_backend("local", {"model_path": tiny("llava"), "prompt_template": "no placeholder"}, tok)


def test_timeout_bad_instruction_and_closed_backend(tiny):
    tok = _tokenizer("rt2")
    backend = create_backend("local", {"model_path": tiny("causal_lm"), "device": "cpu"}, tok)
    obs = _observations(1, 0)[0]
    with pytest.raises(BackendTimeout):
        backend.infer(obs, timeout_s=1e-6)
    with pytest.raises(BackendTimeout):
        backend.infer(obs, timeout_s=0.0)
    with pytest.raises(BackendError, match="instruction is empty"):
        backend.infer(Observation(obs.image, "  ", seq=5, stamp=0.0), timeout_s=30.0)
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.infer(obs, timeout_s=30.0)


def _two_cameras(seed: int = 0) -> Observation:
    rng = np.random.default_rng(seed)
    scene = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    wrist = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    return Observation(scene, "open the drawer", seq=4, stamp=0.0, images={"camera": scene, "wrist": wrist})


@pytest.mark.parametrize("cameras", [[], ["wrist"], ["camera", "wrist"], ["wrist", "camera"]])
def test_cameras_reach_the_processor_in_order(tiny, cameras):
    """[] = the primary only; listed cameras become the processor's images, one placeholder each."""
    from PIL import Image
    from tiny_models import IMAGE_ID
    from transformers import AutoProcessor

    tok = _tokenizer("rt2")
    path = tiny("llava")
    backend = create_backend("local", {"model_path": path, "device": "cpu", "cameras": cameras}, tok)
    obs = _two_cameras()
    inputs = backend._model_inputs([backend._prompt_and_images(obs)])
    names = cameras or ["camera"]
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    expected = processor(text="<image>" * len(names) + tok.prompt(obs.instruction),
                         images=[Image.fromarray(obs.images[n]) for n in names], return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == len(names)
    assert bool((inputs["pixel_values"] == expected["pixel_values"]).all())
    assert inputs["input_ids"].tolist() == expected["input_ids"].tolist()
    per_image = int((processor(text="<image>x", images=Image.fromarray(obs.image), return_tensors="pt")["input_ids"]
                     == IMAGE_ID).sum())
    assert per_image > 1 and int((inputs["input_ids"] == IMAGE_ID).sum()) == per_image * len(names)
    tok.parse_text(backend.infer(obs, timeout_s=30.0).text)  # the model answers a valid action
    backend.close()


def test_missing_camera_names_it(tiny):
    backend = create_backend("local", {"model_path": tiny("llava"), "device": "cpu", "cameras": ["camera", "wrist"]},
                             _tokenizer("rt2"))
    with pytest.raises(BackendError, match=r"local: camera 'wrist' \(backend\.local\.cameras\) is not in this "
                                           r"observation \(it has: camera\)"):
        backend.infer(_observations(1, 0)[0], timeout_s=30.0)
    backend.close()


def test_causal_lm_ignores_cameras(tiny):
    tok = _tokenizer("rt2")
    backend = create_backend("local", {"model_path": tiny("causal_lm"), "device": "cpu",
                                       "cameras": ["camera", "wrist"]}, tok)
    tok.parse_text(backend.infer(_observations(1, 0)[0], timeout_s=30.0).text)
    backend.close()


def test_several_cameras_need_an_image_placeholder(tiny, monkeypatch):
    """A processor without an image token (OpenVLA's takes one image) cannot be given several."""
    from rt2_ros.backends.local_hf import LocalHFBackend

    load = LocalHFBackend._load_model

    def without_image_token(self):
        kind, model, processor, hf_tokenizer = load(self)
        processor.image_token = None
        return kind, model, processor, hf_tokenizer

    monkeypatch.setattr(LocalHFBackend, "_load_model", without_image_token)
    options = {"model_path": tiny("llava"), "device": "cpu"}
    with pytest.raises(BackendConfigError, match=r"backend\.local\.cameras: .*no image placeholder token"):
        create_backend("local", {**options, "cameras": ["camera", "wrist"]}, _tokenizer("rt2"))
    create_backend("local", {**options, "cameras": ["wrist"]}, _tokenizer("rt2")).close()  # one image is fine


# ---------------------------------------------------------------------------------------------
# Configuration errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,match", [("", "not set"), ("/nonexistent/rt2_model", "no such directory")])
def test_missing_model_path_names_the_key(path, match):
    with pytest.raises(BackendConfigError, match=rf"backend\.local\.model_path: .*{match}"):
        create_backend("local", {"model_path": path}, _tokenizer("rt2"))


def test_directory_without_config_names_the_key(tmp_path):
    with pytest.raises(BackendConfigError, match=r"backend\.local\.model_path: .*config\.json"):
        create_backend("local", {"model_path": str(tmp_path)}, _tokenizer("rt2"))


def test_torch_missing_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(BackendConfigError, match=r"pip install -r requirements-local\.txt"):
        create_backend("local", {"model_path": str(tmp_path)}, _tokenizer("rt2"))


def test_remote_code_checkpoint_needs_trust(tiny, tmp_path):
    import json
    import shutil

    model_dir = tmp_path / "remote"
    shutil.copytree(tiny("llava"), model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BackendConfigError, match=r"backend\.local\.trust_remote_code: .*AutoModelForVision2Seq"):
        create_backend("local", {"model_path": str(model_dir)}, _tokenizer("rt2"))


def test_unknown_option_and_bad_choice_name_the_key(tiny):
    with pytest.raises((BackendConfigError, ValueError), match=r"backend\.local\.device"):
        create_backend("local", {"model_path": tiny("causal_lm"), "device": "tpu"}, _tokenizer("rt2"))
    with pytest.raises(BackendConfigError, match=r"backend\.local\.cameras: camera 'wrist' is listed twice"):
        create_backend("local", {"model_path": tiny("causal_lm"), "cameras": ["wrist", "wrist"]}, _tokenizer("rt2"))


def test_cuda_without_a_gpu_names_the_key(tiny):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendConfigError, match=r"backend\.local\.device: cuda"):
        create_backend("local", {"model_path": tiny("causal_lm"), "device": "cuda"}, _tokenizer("rt2"))


def test_id_map_beyond_the_model_vocabulary_is_a_config_error(tiny):
    tok = ActionTokenizer.from_profile("openvla", token_form="ids")  # default vocab_size 32000 > tiny model
    with pytest.raises(BackendConfigError, match=r"tokenizer\.vocab_size"):
        create_backend("local", {"model_path": tiny("llava"), "device": "cpu"}, tok)
