"""Constrained decoding: a token grammar that lets a language model emit only valid actions.

A VLA that runs in-process (``backend.type: local``) samples its answer one vocabulary token
at a time. Left alone, an undertrained or off-distribution model answers anything: prose,
nine numbers, ``300``, an unfinished ``12``. The policy node would reject such answers (the
arm holds), but each rejection is a lost control step. Masking the logits so that only tokens
that keep the answer inside the action grammar survive makes *every* answer parse, whatever
the weights, and caps generation at the grammar's length (a latency bound as well).

Two grammars, matching the two ways VLAs spell actions (see ``rt2_ros.tokens``):

* :class:`IdGrammar` — *id form* (OpenVLA's last-256 ids, PaLM-E's least-used tokens):
  position ``i`` allows exactly the vocabulary ids of dimension ``i``'s valid bins, then the
  answer is complete. The ``terminate`` dimension of RT-2 profiles allows only its valid classes.
* :class:`TextGrammar` — *text form* (PaLI-X: ``"1 128 91 241 5 101 127 217"``): a
  character automaton for exactly ``n_dims`` space-separated canonical integers, each in its
  dimension's valid set, walked over the *decoded strings* of the model's vocabulary. Works for
  tokenizers that split numbers into single digits (LLaMA, Qwen), that have multi-digit or
  space-prefixed number tokens (GPT-2 BPE, SentencePiece ``▁12``), or even tokens that span a
  separator (``"5 1"``). A token is allowed only if the automaton survives all its characters
  *and* the answer can still be completed with the vocabulary (checked once per state).

Everything here is plain Python + numpy, importable without torch. The logits processor and
stopping criterion at the bottom are duck-typed over tensors (``new_full``, indexing,
``nan_to_num``) so they too import nothing heavy; ``transformers.generate`` accepts any
callable in a ``LogitsProcessorList``.

Rejected: a regex-to-DFA library (outlines / lm-format-enforcer: large dependencies, one more
moving part on the robot, and they would still need our per-dimension value sets); beam search
or sampling under the grammar by default (greedy is deterministic and what RT-2/OpenVLA use);
mapping tokens to text with ``convert_ids_to_tokens`` alone (SentencePiece's ``▁``, GPT-2's
``Ġ`` and WordPiece's ``##`` all differ; the surface string is measured by decoding instead).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rt2_ros.tokens import ActionTokenizer

#: characters a number-text action answer consists of
ACTION_ALPHABET = frozenset("0123456789 ")

# Piece characters that decode to a space or to nothing in common tokenizers (SentencePiece ``▁``,
# GPT-2 byte-level ``Ġ``, WordPiece ``##`` continuation); only used to pre-filter the vocabulary
# before the exact surface string of each candidate is measured by decoding.
_PIECE_MARKERS = frozenset("▁Ġ#")


class GrammarError(ValueError):
    """The action grammar cannot be built or cannot be satisfied with this vocabulary."""


# ---------------------------------------------------------------------------------------------
# Per-dimension valid bins, from the action tokenizer
# ---------------------------------------------------------------------------------------------

def _bins_ok(tokenizer: ActionTokenizer, bins: np.ndarray) -> bool:
    """True when ``bins`` survives the tokenizer's own parse (text and ids) and decode checks."""
    try:
        tokenizer.parse_text(tokenizer.format_text(bins))
        if not np.array_equal(tokenizer.bins_from_ids(tokenizer.ids_from_bins(bins)), bins):
            return False
        action = tokenizer.decode(bins)
    except ValueError:  # TokenError is a ValueError
        return False
    return action.is_finite()


def zero_motion_bins(tokenizer: ActionTokenizer) -> np.ndarray:
    """The bins of a zero-motion action, valid for the profile (the grammars vary one dimension at a time
    from it; the model-cost simulator answers with it)."""
    from rt2_ros.actions import ArmAction

    candidates = (ArmAction(np.zeros(3), np.zeros(3), 0.0), ArmAction.hold())
    for action in candidates:
        try:
            bins = np.asarray(tokenizer.encode(action), dtype=np.int64)
        except ValueError:  # e.g. the profile wants the other gripper mode
            continue
        if _bins_ok(tokenizer, bins):
            return bins
    raise GrammarError(f"tokenizer profile {tokenizer.profile!r}: cannot encode a zero-motion action into valid bins")


def valid_bins_per_dim(tokenizer: ActionTokenizer) -> tuple[np.ndarray, ...]:
    """For each action dimension, the sorted bins the tokenizer accepts there.

    Measured through the tokenizer's public API (parse, id map and decode must all accept the
    bin) rather than re-deriving its rules, so a profile whose terminate dimension has only two
    or three classes, or whose id map has holes, is honoured without code here knowing why.
    """
    base = zero_motion_bins(tokenizer)
    out = []
    for dim in range(tokenizer.n_dims):
        ok = []
        for b in range(tokenizer.n_bins):
            bins = base.copy()
            bins[dim] = b
            if _bins_ok(tokenizer, bins):
                ok.append(b)
        if not ok:
            raise GrammarError(f"tokenizer profile {tokenizer.profile!r}: dimension {dim} accepts no bin")
        out.append(np.asarray(ok, dtype=np.int64))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Grammars
# ---------------------------------------------------------------------------------------------

class TokenGrammar(abc.ABC):
    """A deterministic automaton over vocabulary ids for one action answer.

    States are small hashable values. ``allowed(state)`` never includes the end-of-sequence
    token; the caller adds it where ``accepts(state)``. An answer is *complete* when it is
    accepted and nothing can extend it (generation must stop there).
    """

    #: the most tokens a valid answer can take (not counting an end-of-sequence token)
    max_tokens: int

    @abc.abstractmethod
    def start(self) -> Any:
        """The state before the first generated token."""

    @abc.abstractmethod
    def advance(self, state: Any, token_id: int) -> Any | None:
        """The state after ``token_id``, or None if the token leaves the grammar."""

    @abc.abstractmethod
    def allowed(self, state: Any) -> np.ndarray:
        """Sorted int64 ids that keep the answer valid *and* completable (no EOS)."""

    @abc.abstractmethod
    def accepts(self, state: Any) -> bool:
        """True when the tokens so far form a whole valid answer."""

    def is_complete(self, state: Any) -> bool:
        return self.accepts(state) and self.allowed(state).size == 0

    def walk(self, token_ids: Iterable[int]) -> Any | None:
        """The state after ``token_ids`` from the start (None once any token is invalid)."""
        state = self.start()
        for t in token_ids:
            state = self.advance(state, int(t))
            if state is None:
                return None
        return state


class IdGrammar(TokenGrammar):
    """Id form: position ``i`` allows exactly ``allowed_ids[i]``; complete after the last position."""

    def __init__(self, allowed_ids: Sequence[Iterable[int]]) -> None:
        self._allowed = tuple(np.unique(np.asarray(list(a), dtype=np.int64)) for a in allowed_ids)
        if not self._allowed or any(a.size == 0 for a in self._allowed):
            raise GrammarError("id grammar: every action position needs at least one allowed token id")
        if any(a[0] < 0 for a in self._allowed):
            raise GrammarError("id grammar: token ids must be non-negative")
        self._sets = tuple(frozenset(a.tolist()) for a in self._allowed)
        self.max_tokens = len(self._allowed)
        self._empty = np.zeros(0, dtype=np.int64)

    def start(self) -> int:
        return 0

    def advance(self, state: int, token_id: int) -> int | None:
        if state >= self.max_tokens or token_id not in self._sets[state]:
            return None
        return state + 1

    def allowed(self, state: int) -> np.ndarray:
        return self._allowed[state] if state < self.max_tokens else self._empty

    def accepts(self, state: int) -> bool:
        return state == self.max_tokens


@dataclass
class _TrieNode:
    children: dict[str, _TrieNode] = field(default_factory=dict)
    ids: list[int] = field(default_factory=list)  # tokens whose surface string ends here


# Text automaton state: (dimension index, digits of the current number so far, at the very start).
_TextState = tuple[int, str, bool]


class TextGrammar(TokenGrammar):
    """Text form: ``[space] N_0 ' ' N_1 ... ' ' N_{n-1}`` over token surface strings.

    ``values_per_dim[i]``: the integers dimension ``i`` accepts (canonical decimal, no sign, no
    leading zeros). ``surfaces``: id -> the text the token adds when decoded mid-answer (see
    :func:`vocab_surfaces`); tokens with characters outside ``0-9`` and space never match. One
    optional leading space is accepted because SentencePiece models naturally start an answer
    with ``▁`` (decoders strip it; the parser ignores surrounding whitespace).
    """

    def __init__(self, values_per_dim: Sequence[Iterable[int]], surfaces: Mapping[int, str],
                 allow_leading_space: bool = True) -> None:
        self._values: list[frozenset[str]] = []
        self._prefixes: list[frozenset[str]] = []
        for dim, values in enumerate(values_per_dim):
            vals = sorted({int(v) for v in values})
            if not vals or vals[0] < 0:
                raise GrammarError(f"text grammar: dimension {dim} needs at least one non-negative value")
            strs = frozenset(str(v) for v in vals)
            self._values.append(strs)
            self._prefixes.append(frozenset(s[:k] for s in strs for k in range(1, len(s) + 1)))
        if not self._values:
            raise GrammarError("text grammar: no action dimensions")
        self._n = len(self._values)
        self._lead = allow_leading_space
        self.max_tokens = int(allow_leading_space) + sum(max(len(s) for s in v) for v in self._values) + self._n - 1

        self._root = _TrieNode()
        for tid, text in surfaces.items():
            if not text or not set(text) <= ACTION_ALPHABET:
                continue
            node = self._root
            for ch in text:
                node = node.children.setdefault(ch, _TrieNode())
            node.ids.append(int(tid))
        self._step_cache: dict[tuple[_TextState, int], _TextState | None] = {}
        self._allowed_cache: dict[_TextState, np.ndarray] = {}
        self._completable_cache: dict[_TextState, bool] = {}
        if not self._completable(self.start()):
            raise GrammarError(
                "text grammar: the model vocabulary cannot spell a valid action (needs tokens for the digits "
                "0-9 and a space); use the id token form for this model")

    # -- character automaton -------------------------------------------------------------------
    def _char(self, state: _TextState, ch: str) -> _TextState | None:
        dim, digits, at_start = state
        if ch == " ":
            if at_start and self._lead:
                return (0, "", False)
            if digits in self._values[dim] and dim < self._n - 1:
                return (dim + 1, "", False)
            return None
        if ch.isdigit():
            nxt = digits + ch
            return (dim, nxt, False) if nxt in self._prefixes[dim] else None
        return None

    def _successors(self, state: _TextState) -> Iterator[tuple[_TextState, list[int]]]:
        """(state after a token, ids of the tokens leading there) for every surviving trie path."""
        stack = [(self._root, state)]
        while stack:
            node, st = stack.pop()
            for ch, child in node.children.items():
                nxt = self._char(st, ch)
                if nxt is None:
                    continue
                if child.ids:
                    yield nxt, child.ids
                if child.children:
                    stack.append((child, nxt))

    def _completable(self, state: _TextState) -> bool:
        cached = self._completable_cache.get(state)
        if cached is None:
            # The automaton only moves forward (each character is consumed), so this recursion
            # terminates; its depth is bounded by max_tokens.
            cached = self.accepts(state) or any(self._completable(nxt) for nxt, _ in self._successors(state))
            self._completable_cache[state] = cached
        return cached

    # -- TokenGrammar --------------------------------------------------------------------------
    def start(self) -> _TextState:
        return (0, "", True)

    def advance(self, state: _TextState, token_id: int) -> _TextState | None:
        key = (state, token_id)
        if key in self._step_cache:
            return self._step_cache[key]
        result = None
        ids_here = self.allowed(state)
        idx = np.searchsorted(ids_here, token_id)
        if idx < ids_here.size and ids_here[idx] == token_id:
            for nxt, ids in self._successors(state):
                if token_id in ids:
                    result = nxt
                    break
        self._step_cache[key] = result
        return result

    def allowed(self, state: _TextState) -> np.ndarray:
        cached = self._allowed_cache.get(state)
        if cached is None:
            ids = {i for nxt, group in self._successors(state) if self._completable(nxt) for i in group}
            cached = np.asarray(sorted(ids), dtype=np.int64)
            self._allowed_cache[state] = cached
        return cached

    def accepts(self, state: _TextState) -> bool:
        dim, digits, _ = state
        return dim == self._n - 1 and digits in self._values[dim]


# ---------------------------------------------------------------------------------------------
# Building grammars from an action tokenizer and a model vocabulary
# ---------------------------------------------------------------------------------------------

def id_grammar(tokenizer: ActionTokenizer, vocab_size: int | None = None) -> IdGrammar:
    """The id-form grammar of ``tokenizer`` (its id map, restricted to each dimension's valid bins).

    ``vocab_size``: the model's logits width; every action id must fit in it.
    """
    base = zero_motion_bins(tokenizer)
    valid = valid_bins_per_dim(tokenizer)
    action_ids = {int(i) for i in np.asarray(tokenizer.valid_token_ids()).ravel()}
    per_dim = []
    for dim, bins in enumerate(valid):
        ids = set()
        for b in bins:
            vec = base.copy()
            vec[dim] = b
            ids.add(int(np.asarray(tokenizer.ids_from_bins(vec))[dim]))
        stray = ids - action_ids
        if stray:
            raise GrammarError(f"tokenizer profile {tokenizer.profile!r}: ids_from_bins gave ids outside "
                               f"valid_token_ids() for dimension {dim}: {sorted(stray)[:5]}")
        per_dim.append(sorted(ids))
    if vocab_size is not None:
        too_big = max(max(ids) for ids in per_dim)
        if too_big >= vocab_size:
            raise GrammarError(f"action token id {too_big} does not fit the model vocabulary of {vocab_size} tokens; "
                               f"set tokenizer.vocab_size (or tokenizer.token_ids) to match the model")
    return IdGrammar(per_dim)


def text_grammar(tokenizer: ActionTokenizer, surfaces: Mapping[int, str]) -> TextGrammar:
    """The text-form grammar of ``tokenizer`` over a vocabulary's token surfaces."""
    return TextGrammar(valid_bins_per_dim(tokenizer), surfaces)


def vocab_surfaces(hf_tokenizer: Any, alphabet: frozenset[str] = ACTION_ALPHABET) -> dict[int, str]:
    """id -> the exact text each number-ish token adds when decoded after another token.

    Duck-typed over a Hugging Face tokenizer (``len``, ``convert_ids_to_tokens``, ``decode``,
    ``all_special_ids``). Only tokens whose piece looks numeric are measured, by decoding them
    after an anchor digit token and taking the difference: this captures SentencePiece's leading
    ``▁`` and WordLevel's joining space exactly as the final ``decode`` will produce them.
    Returns only tokens whose surface is non-empty and within ``alphabet``.
    """
    n = len(hf_tokenizer)
    pieces = hf_tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(getattr(hf_tokenizer, "all_special_ids", ()) or ())
    ok_chars = alphabet | _PIECE_MARKERS
    candidates = [i for i, p in enumerate(pieces)
                  if isinstance(p, str) and p and i not in special and set(p) <= ok_chars and any(c.isdigit() or c
                  in " ▁Ġ" for c in p)]

    def dec(ids: list[int]) -> str:
        return hf_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    anchor = next((i for i in candidates if len(dec([i])) == 1 and dec([i]).isdigit()), None)
    if anchor is None:
        return {}
    head = dec([anchor])
    out: dict[int, str] = {}
    for i in candidates:
        both = dec([anchor, i])
        if not both.startswith(head):
            continue
        text = both[len(head):]
        if text and set(text) <= alphabet:
            out[i] = text
    return out


# ---------------------------------------------------------------------------------------------
# Hooks for transformers.generate (duck-typed over torch tensors; torch is not imported here)
# ---------------------------------------------------------------------------------------------

# Allowed logits that are -inf/NaN (e.g. suppressed by a generation config) are lifted to this
# floor so that argmax still picks an allowed token; finite in float16 and bfloat16.
_FLOOR_LOGIT = -1.0e4


class GrammarLogitsProcessor:
    """Masks every logit the grammar forbids; forces EOS once the answer is complete.

    ``prompt_length``: how many leading ids of ``input_ids`` are the prompt (decoder-only
    models) — 1 for encoder-decoder models (the decoder start token). Rows that already
    produced EOS (padding after it) or left the grammar are left untouched.
    """

    def __init__(self, grammar: TokenGrammar, prompt_length: int, eos_token_id: int | None) -> None:
        self.grammar = grammar
        self.prompt_length = int(prompt_length)
        self.eos_token_id = eos_token_id

    def row_allowed(self, generated: Sequence[int]) -> list[int] | None:
        """Ids allowed after ``generated`` (EOS included where the answer may end); None = row is done."""
        if self.eos_token_id is not None and self.eos_token_id in generated:
            return None
        state = self.grammar.walk(generated)
        if state is None:
            return None
        ids = self.grammar.allowed(state).tolist()
        if self.grammar.accepts(state) and self.eos_token_id is not None:
            ids.append(int(self.eos_token_id))
        return ids

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        out = scores.new_full(scores.shape, float("-inf"))
        width = scores.shape[-1]
        for row in range(scores.shape[0]):
            ids = self.row_allowed(input_ids[row, self.prompt_length:].tolist())
            if ids is None:
                out[row] = scores[row]
                continue
            ids = [i for i in ids if i < width]
            if not ids:
                # A complete answer on a model without EOS: the stopping criterion ends generation
                # before this step is sampled; keep the row unconstrained rather than crash.
                out[row] = scores[row]
                continue
            out[row, ids] = scores[row, ids].nan_to_num(nan=_FLOOR_LOGIT, posinf=None, neginf=_FLOOR_LOGIT)
        return out


class GrammarStoppingCriteria:
    """Stops a row as soon as its answer is complete, or accepted on a model without EOS.

    This saves the forward pass that would only produce the forced EOS (id form: generation
    takes exactly ``n_dims`` model steps).
    """

    def __init__(self, grammar: TokenGrammar, prompt_length: int, eos_token_id: int | None) -> None:
        self.grammar = grammar
        self.prompt_length = int(prompt_length)
        self.eos_token_id = eos_token_id

    def __deepcopy__(self, memo: dict) -> GrammarStoppingCriteria:
        # generate() deep-copies its stopping criteria; the grammar and its caches are shared on
        # purpose (copying them per call would cost more than the generation of a tiny model).
        return self

    def row_done(self, generated: Sequence[int]) -> bool:
        if self.eos_token_id is not None and self.eos_token_id in generated:
            return True
        state = self.grammar.walk(generated)
        if state is None:
            return False
        return self.grammar.is_complete(state) or (self.eos_token_id is None and self.grammar.accepts(state))

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        flags = [self.row_done(input_ids[row, self.prompt_length:].tolist()) for row in range(input_ids.shape[0])]
        return input_ids.new_tensor(flags).bool()
