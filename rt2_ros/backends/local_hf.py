"""``backend.type: local`` — a Hugging Face transformers VLM in this process, with constrained decoding.

For a robot with its own GPU (or a small model on the CPU) the network hop to a policy server
is pure latency and one more thing to fail. This backend loads a checkpoint from a local
directory (no hub access ever: ``local_files_only=True``), prompts it RT-2/OpenVLA style
(``tokenizer.prompt(instruction)`` plus the camera image through the model's processor) and
decodes greedily under the action grammar of :mod:`rt2_ros.constrained`, so every answer parses
into exactly ``n_dims`` valid bins whatever the weights, and generation never runs past the
grammar's length.

Two model paths:

* ``image_text_to_text``: ``AutoModelForImageTextToText`` + ``AutoProcessor`` (LLaVA, PaliGemma,
  Idefics, Qwen2-VL, ...); checkpoints that ship their own code (OpenVLA's
  ``AutoModelForVision2Seq`` in ``auto_map``) load with ``trust_remote_code: true``.
* ``causal_lm``: ``AutoModelForCausalLM`` + ``AutoTokenizer``, text only — the image is
  *ignored*. Useful for a language-only policy and for plumbing tests; not a VLA.

Cameras: the primary camera's frame by default (``cameras: []``; OpenVLA and RT-2 were trained on
one view). Listing cameras passes their frames, in that order, as the processor's list of images,
with one image placeholder per image in the prompt (``{image}``); that needs a processor with an
image placeholder token (LLaVA, PaliGemma, Idefics, Qwen2-VL have one; OpenVLA's has none, and it
takes one image), which is checked when the backend is built.

The answer goes back as ``BackendReply.text`` (number form) or ``BackendReply.token_ids`` (id
form); the policy node parses and validates it like any other backend's answer.

torch and transformers are an optional extra (``requirements-local.txt``), imported only when
this backend is built. Rejected: OpenVLA's ``predict_action`` (model-specific, un-normalises
inside the model and bypasses the tokenizer profile and its validation); vLLM in-process
(a server belongs behind ``backend.type: openai``); sampling by default (greedy is what
RT-2/OpenVLA deploy and it is reproducible).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends.base import (
    Backend,
    BackendConfigError,
    BackendError,
    BackendTimeout,
    camera_frames,
    check_camera_names,
)
from rt2_ros.constrained import (
    GrammarError,
    GrammarLogitsProcessor,
    GrammarStoppingCriteria,
    TokenGrammar,
    id_grammar,
    text_grammar,
    vocab_surfaces,
)
from rt2_ros.params import ConfigError, ParamSpec, resolve

if TYPE_CHECKING:
    from rt2_ros.tokens import ActionTokenizer

_log = logging.getLogger(__name__)

_P = "backend.local."

INSTALL_HINT = "pip install -r requirements-local.txt"

# auto_map keys of checkpoints with their own modelling code, in order of preference
_REMOTE_VLM_KEYS = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")

# max_new_tokens when the grammar cannot be built and decoding is unconstrained
_UNCONSTRAINED_FALLBACK_TOKENS = 64

# The hand state in the prompt ({state} in prompt_template): x y z over this box (the default safety
# workspace) and the gripper closedness, each as a bin 0..255, so a model whose vocabulary has one
# token per number (rt2-train's) reads the state as 4 tokens.
STATE_MIN_M = (0.25, -0.35, 0.02)
STATE_MAX_M = (0.75, 0.35, 0.55)
STATE_BINS = 256


def state_text(position: Sequence[float], gripper: float, lo: Sequence[float] = STATE_MIN_M,
               hi: Sequence[float] = STATE_MAX_M) -> str:
    """``"x y z g"``: the end-effector position over the box [lo, hi] (clamped) and the gripper closedness
    0..1, each as an integer bin 0..255. rt2-train builds its prompts with this same function."""
    p = np.asarray(position, dtype=np.float64).reshape(3)
    lo_, hi_ = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    unit = np.clip((p - lo_) / (hi_ - lo_), 0.0, 1.0)
    bins = [*np.rint(unit * (STATE_BINS - 1)).astype(int), round(min(1.0, max(0.0, float(gripper))) * (STATE_BINS - 1))]
    return " ".join(str(int(b)) for b in bins)


class LocalHFBackend(Backend):
    """``backend.type: local`` — greedy, grammar-constrained generation with a local transformers model."""

    name = "local"

    OPTIONS: tuple[ParamSpec, ...] = (
        ParamSpec(_P + "model_path", "string", "",
                  "Local directory of a transformers checkpoint (config.json, weights, tokenizer/processor files), "
                  "e.g. an OpenVLA-7B or PaliGemma fine-tune download. Nothing is ever fetched from a hub."),
        ParamSpec(_P + "device", "string", "auto", "Where the model runs; auto = cuda when available, else cpu.",
                  choices=("auto", "cpu", "cuda")),
        ParamSpec(_P + "dtype", "string", "auto",
                  "Weight dtype; auto = float32 on cpu, bfloat16 on cuda (float16 where bf16 is unsupported).",
                  choices=("auto", "float32", "float16", "bfloat16")),
        ParamSpec(_P + "model_class", "string", "auto",
                  "How to load the checkpoint: image_text_to_text (VLM + processor), causal_lm (text only, the "
                  "image is ignored), auto = from config.json.",
                  choices=("auto", "image_text_to_text", "causal_lm")),
        ParamSpec(_P + "constrained", "bool", True,
                  "Mask the logits so only valid action tokens can be generated (every answer parses). Turn off "
                  "only to diagnose a model."),
        ParamSpec(_P + "max_new_tokens", "int", 0,
                  "Generation cap in tokens; 0 = the action grammar's maximum length (n_dims for ids; the longest "
                  "number text + 1 for end-of-sequence for text).",
                  "tokens", low=0, high=4096),
        ParamSpec(_P + "cameras", "string_array", [],
                  "Cameras (names of the policy node's cameras.names) whose frames the processor gets, in this "
                  "order; [] = the primary camera only. Several need a processor with an image placeholder token. "
                  "A listed camera missing from an observation fails the request. Ignored by causal_lm."),
        ParamSpec(_P + "prompt_template", "string", "{image}{prompt}",
                  "Text given to the model: {prompt} = the tokenizer profile's prompt for the instruction, {image} "
                  "= the processor's image placeholder token, once per image ('' if it has none, and always '' for "
                  "causal_lm), optional {state} = the hand state 'x y z g' as bins 0..255 (position over "
                  "state_min..state_max, gripper closedness); with {state} a request without a fresh ee_pose and "
                  "gripper reading fails (the arm holds)."),
        ParamSpec(_P + "state_min", "double_array", list(STATE_MIN_M),
                  "Position mapped to bin 0 in {state} (base frame; the model's training box)", "m", -10.0, 10.0,
                  length=3),
        ParamSpec(_P + "state_max", "double_array", list(STATE_MAX_M),
                  "Position mapped to bin 255 in {state}", "m", -10.0, 10.0, length=3),
        ParamSpec(_P + "append_token_ids", "int_array", [],
                  "Token ids appended after the tokenized prompt (OpenVLA expects [29871], an empty-space token, "
                  "before the first action token).", low=0),
        ParamSpec(_P + "trust_remote_code", "bool", False,
                  "Run modelling code shipped inside model_path (needed for OpenVLA). Only for checkpoints you "
                  "trust: it executes Python from that directory."),
        ParamSpec(_P + "num_threads", "int", 0,
                  "torch CPU threads for the whole process; 0 = torch's default.", low=0, high=1024),
    )

    def __init__(self, options: dict, tokenizer: ActionTokenizer) -> None:
        try:
            resolved = resolve(self.OPTIONS, {_P + k: v for k, v in options.items()})
        except ConfigError as exc:
            raise BackendConfigError(str(exc)) from None
        opts = {k[len(_P):]: v for k, v in resolved.items()}
        super().__init__(opts, tokenizer)
        self._model_path = _check_model_path(opts["model_path"])
        if "{prompt}" not in opts["prompt_template"]:
            raise BackendConfigError(f"{_P}prompt_template: must contain {{prompt}}, got {opts['prompt_template']!r}")
        if not all(lo < hi for lo, hi in zip(opts["state_min"], opts["state_max"], strict=True)):
            raise BackendConfigError(f"{_P}state_min {opts['state_min']} must be below {_P}state_max "
                                     f"{opts['state_max']} on every axis")
        self._cameras = check_camera_names(opts["cameras"], f"{_P}cameras")
        self._lock = threading.Lock()
        self._torch, self._transformers = _import_torch()
        self._device, self._dtype = self._resolve_device_dtype()
        if opts["num_threads"]:
            self._torch.set_num_threads(opts["num_threads"])

        t0 = time.monotonic()
        self._kind, self._model, self._processor, self._hf_tokenizer = self._load_model()
        self.load_time_s = time.monotonic() - t0
        self._is_encoder_decoder = bool(getattr(self._model.config, "is_encoder_decoder", False))
        self._eos_token_id = self._find_eos()
        # Batches are left-padded, so every row's answer starts at the same column; a tokenizer without a
        # pad token pads with EOS (masked out by the attention mask), one with neither answers row by row.
        self._hf_tokenizer.padding_side = "left"
        if self._hf_tokenizer.pad_token_id is None and self._eos_token_id is not None:
            self._hf_tokenizer.pad_token = self._hf_tokenizer.convert_ids_to_tokens(self._eos_token_id)
        self._can_batch = self._hf_tokenizer.pad_token_id is not None
        self._token_form = self._resolve_token_form()
        self._grammar = self._build_grammar()
        limit = opts["max_new_tokens"]
        if limit == 0 and self._grammar is None:
            limit = _UNCONSTRAINED_FALLBACK_TOKENS
        elif limit == 0:
            # id answers have a fixed length (OpenVLA generates exactly n_dims tokens, no EOS); a text
            # answer may need one more step for the end-of-sequence token.
            limit = self._grammar.max_tokens + (0 if self._token_form == "ids" else 1)
        self._max_new_tokens = limit
        self._image_token = getattr(self._processor, "image_token", None) if self._processor is not None else None
        if len(self._cameras) > 1 and self._kind == "image_text_to_text" and not self._image_token:
            raise BackendConfigError(f"{_P}cameras: {self._cameras} are several images, but the processor in "
                                     f"{self._model_path} has no image placeholder token to place them in the "
                                     f"prompt (it takes one image); list one camera")
        _log.info("local backend: %s (%s) on %s/%s, %s form, %s decoding, max %d new tokens, loaded in %.2f s",
                  self._model_path, self._kind, self._device, str(self._dtype).removeprefix("torch."),
                  self._token_form, "constrained" if opts["constrained"] else "UNCONSTRAINED", self._max_new_tokens,
                  self.load_time_s)

    # -- public read-only facts (logs, diagnostics, tests) ------------------------------------------
    @property
    def token_form(self) -> str:
        """'text' or 'ids': how answers come back (``BackendReply.text`` or ``.token_ids``)."""
        return self._token_form

    @property
    def model_kind(self) -> str:
        """'image_text_to_text' or 'causal_lm'."""
        return self._kind

    @property
    def grammar(self) -> TokenGrammar | None:
        """The action grammar (None only when unconstrained and the vocabulary cannot spell actions)."""
        return self._grammar

    @property
    def max_new_tokens(self) -> int:
        return self._max_new_tokens

    # -- Backend -------------------------------------------------------------------------------------
    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        result = self.infer_batch([observation], timeout_s)[0]
        if isinstance(result, BackendError):
            raise result
        return result

    def infer_batch(self, observations: Sequence[Observation], timeout_s: float) -> list[BackendReply | BackendError]:
        """One batched, grammar-constrained ``generate`` for all ``observations`` (left-padded prompts, one
        grammar state per row); each row's answer is the one :meth:`infer` gives it alone (greedy)."""
        if not timeout_s > 0:
            raise BackendTimeout(f"local: no time budget left ({timeout_s:.3f} s)")
        if len(observations) > 1 and not self._can_batch:
            return super().infer_batch(observations, timeout_s)
        results: list[BackendReply | BackendError | None] = [None] * len(observations)
        with self._lock:
            if self._model is None:
                raise BackendError("local: backend is closed")
            t0 = time.monotonic()
            rows: list[int] = []
            prompts: list[tuple[str, list[Any]]] = []
            for i, observation in enumerate(observations):
                try:  # a bad observation (empty instruction, missing camera) fails alone
                    prompts.append(self._prompt_and_images(observation))
                    rows.append(i)
                except BackendError as exc:
                    results[i] = exc
            if rows:
                inputs = self._model_inputs(prompts)
                prompt_length = 1 if self._is_encoder_decoder else int(inputs["input_ids"].shape[1])
                generated = self._generate(inputs, prompt_length, timeout_s)
            elapsed = time.monotonic() - t0
        if rows and elapsed > timeout_s:
            raise BackendTimeout(f"local: generation took {elapsed:.3f} s, over the {timeout_s:.3f} s budget")
        for i, new_ids in zip(rows, generated if rows else [], strict=True):
            results[i] = self._reply(observations[i].seq, new_ids, elapsed)
        return results  # type: ignore[return-value]

    def _reply(self, seq: int, new_ids: list[int], elapsed: float) -> BackendReply | BackendError:
        if self._grammar is not None and self.options["constrained"]:
            state = self._grammar.walk(new_ids)
            if state is None or not self._grammar.accepts(state):
                # Only a generation cut short (max_time, a too small max_new_tokens) ends here.
                return BackendError(f"local: generation stopped before a whole action ({len(new_ids)} tokens); "
                                    f"raise {_P}max_new_tokens or set it to 0")
        if self._token_form == "ids":
            return BackendReply(seq=seq, backend=self.name, token_ids=tuple(new_ids), server_time_s=elapsed)
        text = self._hf_tokenizer.decode(new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return BackendReply(seq=seq, backend=self.name, text=text.strip(), server_time_s=elapsed)

    def close(self) -> None:
        with self._lock:
            on_cuda = self._device == "cuda"
            self._model = None
            self._processor = None
        if on_cuda:
            self._torch.cuda.empty_cache()

    # -- loading -------------------------------------------------------------------------------------
    def _resolve_device_dtype(self) -> tuple[str, Any]:
        torch = self._torch
        device = self.options["device"]
        has_cuda = bool(torch.cuda.is_available())
        if device == "auto":
            device = "cuda" if has_cuda else "cpu"
        elif device == "cuda" and not has_cuda:
            raise BackendConfigError(f"{_P}device: cuda requested but torch sees no CUDA device "
                                     f"(torch {torch.__version__}); use cpu or auto")
        name = self.options["dtype"]
        if name == "auto":
            if device == "cpu":
                name = "float32"
            else:
                name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return device, getattr(torch, name)

    def _load_model(self) -> tuple[str, Any, Any, Any]:
        tf = self._transformers
        path = self._model_path
        trust = self.options["trust_remote_code"]
        common = {"local_files_only": True, "trust_remote_code": trust}
        raw_auto_map = _raw_config(path).get("auto_map") or {}
        if raw_auto_map and not trust:
            classes = ", ".join(sorted(raw_auto_map))
            raise BackendConfigError(f"{_P}trust_remote_code: {path} ships its own model code ({classes}); "
                                     f"set it to true if you trust that checkpoint")
        try:
            config = tf.AutoConfig.from_pretrained(path, **common)
        except (OSError, ValueError, KeyError) as exc:
            raise BackendConfigError(f"{_P}model_path: cannot read the model config in {path}: {_one_line(exc)}"
                                     ) from None
        kind = self.options["model_class"]
        auto_map = dict(getattr(config, "auto_map", None) or {})
        remote_key = next((k for k in _REMOTE_VLM_KEYS if k in auto_map), None)
        if kind == "auto":
            from transformers.models.auto import modeling_auto

            model_type = getattr(config, "model_type", "")
            if remote_key is not None or model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
                kind = "image_text_to_text"
            elif model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in auto_map:
                kind = "causal_lm"
            else:
                raise BackendConfigError(
                    f"{_P}model_class: cannot tell how to load model type {config.model_type!r} from {path}; "
                    f"set image_text_to_text or causal_lm (remote-code checkpoints need {_P}trust_remote_code)")
        load = {**common, "dtype": self._dtype}
        try:
            if kind == "image_text_to_text":
                if remote_key is not None:
                    from transformers.dynamic_module_utils import get_class_from_dynamic_module

                    model_cls = get_class_from_dynamic_module(auto_map[remote_key], path, local_files_only=True)
                else:
                    model_cls = tf.AutoModelForImageTextToText
                model = model_cls.from_pretrained(path, **load)
                processor = tf.AutoProcessor.from_pretrained(path, **common)
                hf_tokenizer = getattr(processor, "tokenizer", None)
                if hf_tokenizer is None:
                    raise BackendConfigError(f"{_P}model_path: the processor in {path} has no tokenizer")
            else:
                model = tf.AutoModelForCausalLM.from_pretrained(path, **load)
                processor = None
                hf_tokenizer = tf.AutoTokenizer.from_pretrained(path, **common)
        except BackendConfigError:
            raise
        except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
            raise BackendConfigError(f"{_P}model_path: cannot load {kind} model from {path}: {_one_line(exc)}"
                                     ) from None
        model.to(self._device)
        model.eval()
        return kind, model, processor, hf_tokenizer

    def _find_eos(self) -> int | None:
        candidates: list[Any] = []
        gen_cfg = getattr(self._model, "generation_config", None)
        if gen_cfg is not None:
            candidates.append(gen_cfg.eos_token_id)
        candidates.append(getattr(self._hf_tokenizer, "eos_token_id", None))
        for c in candidates:
            if isinstance(c, (list, tuple)):
                c = c[0] if c else None
            if isinstance(c, int) and c >= 0:
                return c
        return None  # the stopping criterion ends generation instead

    def _resolve_token_form(self) -> str:
        # tokenizer.token_form is the single source of truth: the policy node parses with it too.
        form = getattr(self.tokenizer, "token_form", "text")
        if form not in ("text", "ids"):
            raise BackendConfigError(f"tokenizer.token_form: the local backend supports text or ids, got {form!r}")
        return form

    def _vocab_size(self) -> int:
        head = self._model.get_output_embeddings() if hasattr(self._model, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) is not None:
            return int(head.weight.shape[0])
        return len(self._hf_tokenizer)

    def _build_grammar(self) -> TokenGrammar | None:
        try:
            if self._token_form == "ids":
                return id_grammar(self.tokenizer, vocab_size=self._vocab_size())
            return text_grammar(self.tokenizer, vocab_surfaces(self._hf_tokenizer))
        except GrammarError as exc:
            if not self.options["constrained"]:
                _log.warning("local backend: no action grammar (%s); decoding unconstrained", exc)
                return None
            raise BackendConfigError(f"tokenizer.token_form={self._token_form}: {exc}") from None

    # -- inference -----------------------------------------------------------------------------------
    def _prompt_text(self, observation: Observation, n_images: int = 1) -> str:
        image_token = self._image_token if (self._kind == "image_text_to_text" and self._image_token) else ""
        try:
            prompt = self.tokenizer.prompt(observation.instruction)
        except ValueError as exc:  # TokenError: e.g. an empty instruction
            raise BackendError(f"local: cannot build the prompt: {exc}") from None
        template = self.options["prompt_template"]
        if "{state}" in template:
            if observation.ee_position is None or observation.gripper is None:
                missing = " and ".join(n for n, v in (("ee_pose", observation.ee_position),
                                                       ("gripper", observation.gripper)) if v is None)
                raise BackendError(f"local: {_P}prompt_template has {{state}} but the observation has no fresh "
                                   f"{missing} (is the arm driver publishing ee_pose and joint_states?)")
            template = template.replace("{state}", state_text(observation.ee_position, observation.gripper,
                                                              self.options["state_min"], self.options["state_max"]))
        return template.replace("{image}", image_token * n_images).replace("{prompt}", prompt)

    def _prompt_and_images(self, observation: Observation) -> tuple[str, list[Any]]:
        """The prompt text and the PIL images (none for causal_lm) of one observation."""
        if self._kind != "image_text_to_text":
            return self._prompt_text(observation), []
        from PIL import Image

        frames = camera_frames(observation, self._cameras, f"{_P}cameras", self.name)
        images = [Image.fromarray(np.ascontiguousarray(f)) for _, f in frames]  # uint8 HxWx3 -> RGB
        return self._prompt_text(observation, len(images)), images

    def _model_inputs(self, prompts: Sequence[tuple[str, list[Any]]]) -> dict[str, Any]:
        """Model inputs of a batch of (prompt, images), prompts left-padded to one length so that every
        row's answer starts at the same column."""
        torch = self._torch
        texts = [text for text, _ in prompts]
        padding = {"padding": True} if len(prompts) > 1 else {}
        try:
            if self._kind == "image_text_to_text":
                # one image per row as itself (what single-image processors expect), several as a list
                images = [imgs[0] if len(imgs) == 1 else imgs for _, imgs in prompts]
                inputs = dict(self._processor(text=texts if len(texts) > 1 else texts[0],
                                              images=images if len(images) > 1 else images[0],
                                              return_tensors="pt", **padding))
            else:
                inputs = dict(self._hf_tokenizer(texts if len(texts) > 1 else texts[0], return_tensors="pt",
                                                 **padding))
        except (ValueError, TypeError, KeyError) as exc:
            raise BackendError(f"local: the processor rejected the prompt/image: {_one_line(exc)}") from None
        extra = self.options["append_token_ids"]
        if extra:
            ids = inputs["input_ids"]
            tail = torch.tensor([extra] * ids.shape[0], dtype=ids.dtype)
            inputs["input_ids"] = torch.cat([ids, tail], dim=1)
            if "attention_mask" in inputs:
                mask = inputs["attention_mask"]
                inputs["attention_mask"] = torch.cat([mask, torch.ones_like(tail, dtype=mask.dtype)], dim=1)
        out = {}
        for key, value in inputs.items():
            if hasattr(value, "to"):
                value = value.to(self._device)
                if value.is_floating_point():
                    value = value.to(self._dtype)  # pixel values follow the weights' dtype
            out[key] = value
        return out

    def _generate(self, inputs: dict[str, Any], prompt_length: int, timeout_s: float) -> list[list[int]]:
        tf = self._transformers
        eos = self._eos_token_id
        processors = tf.LogitsProcessorList()
        criteria = tf.StoppingCriteriaList()
        if self._grammar is not None and self.options["constrained"]:
            processors.append(GrammarLogitsProcessor(self._grammar, prompt_length, eos))
            criteria.append(GrammarStoppingCriteria(self._grammar, prompt_length, eos))
        # A fresh GenerationConfig: the checkpoint's own defaults (sampling, temperature, forced or
        # suppressed tokens) must not change what the grammar allows.
        gen_cfg = tf.GenerationConfig(
            max_new_tokens=self._max_new_tokens, do_sample=False, num_beams=1, max_time=timeout_s,
            eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
        )
        try:
            with self._torch.inference_mode():
                out = self._model.generate(**inputs, generation_config=gen_cfg, logits_processor=processors,
                                           stopping_criteria=criteria)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise BackendError(f"local: generation failed: {_one_line(exc)}") from None
        start = 1 if self._is_encoder_decoder else int(inputs["input_ids"].shape[1])
        return [self._answer_ids([int(t) for t in row]) for row in out[:, start:].tolist()]

    def _answer_ids(self, new_ids: list[int]) -> list[int]:
        """A row's answer: its ids up to EOS, or, on a model without EOS, up to where the grammar ended it
        (a row that finished before the others in its batch is padded after that)."""
        eos = self._eos_token_id
        if eos is not None:
            return new_ids[:new_ids.index(eos)] if eos in new_ids else new_ids
        if self._grammar is not None and self.options["constrained"]:
            done = GrammarStoppingCriteria(self._grammar, 0, None)
            return next((new_ids[:k] for k in range(1, len(new_ids) + 1) if done.row_done(new_ids[:k])), new_ids)
        return new_ids


def _check_model_path(path: str) -> str:
    if not path:
        raise BackendConfigError(f"{_P}model_path: not set; point it at a local transformers model directory "
                                 f"(config.json + weights + tokenizer/processor files)")
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(full):
        raise BackendConfigError(f"{_P}model_path: no such directory {full!r}")
    if not os.path.isfile(os.path.join(full, "config.json")):
        raise BackendConfigError(f"{_P}model_path: {full!r} has no config.json (not a transformers model directory)")
    return full


def _raw_config(path: str) -> dict:
    """config.json as a dict (read before transformers so remote-code checkpoints get a clear error)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise BackendConfigError(f"{_P}model_path: cannot read {path}/config.json: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise BackendConfigError(f"{_P}model_path: {path}/config.json is not a JSON object")
    return data


def _import_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "torch/transformers"
        raise BackendConfigError(f"backend.type: 'local' needs torch and transformers ({missing} is not importable): "
                                 f"{INSTALL_HINT}") from None
    return torch, transformers


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."
