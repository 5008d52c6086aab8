"""``rt2-train``: a small RT-2-style VLA trained from scratch on demonstrations, saved for ``backend.type: local``.

What it builds: a Hugging Face LLaVA (``LlavaForConditionalGeneration``: a CLIP vision tower, a
two-layer projector and a Llama decoder), every weight random at the start, nothing downloaded,
with its own word-level tokenizer that has one token per number 0..255 (so an RT-2 answer such as
``"0 128 127 3 127 127 127 255"`` is exactly 8 tokens, plus end-of-sequence) and a
``LlavaProcessor``. It is trained with next-token loss on the action text that follows the RT-2
prompt, built exactly as :class:`~rt2_ros.backends.local_hf.LocalHFBackend` builds it at run time
(``prompt_template`` ``{image}{prompt}``: one image placeholder per camera, then
``"Q: what action should the robot take to <instruction>? A:"``), so the saved directory loads in
the ``local`` backend as it is and answers under its constrained decoding.

Inputs: the image(s) and the instruction; with ``--state`` also the hand state, as four numbers
(x y z gripper, bins 0..255, :func:`rt2_ros.backends.local_hf.state_text`) between the images and the
prompt (``STATE_PROMPT_TEMPLATE``, which the ``local`` backend fills from the observation's ee_pose and
gripper). Without it the wrist camera shows part of what the state would tell (fingers open or closed,
a cube held, the height above the table) and the model must read it from pixels.

Design choices for training on a CPU in tens of minutes (measured: ~150-250 samples/s on one
thread with the defaults):

* 64 px images cut into 16 px patches by default: 16 image tokens per camera (the fixed camera
  and the wrist camera), a sequence of ~60 tokens; a few hundred thousand parameters. The shipped
  checkpoint (``make train-learned``) uses 128 px in 32 px patches: still 16 tokens per camera, at
  twice the resolution (64 tokens per camera is ~4.5x slower per sample).
* The loss is computed on the answer only (the prompt is given). The six motion dimensions use
  a soft target, a Gaussian over neighbouring bins (``--bin-sigma``): bins are ordered numbers,
  and an answer one bin off is nearly right, which plain cross-entropy does not know. Terminate,
  gripper and end-of-sequence are one-hot.
* Images are preprocessed once (the processor's own resize/crop; scaling and normalisation are
  the processor's constants, applied per batch) and kept as uint8; a mild brightness/contrast
  jitter per sample is the only augmentation (geometry carries the action, so no shifts or flips).
* Held-out data is split by episode (the last ``--val-fraction`` of episodes), never by frame:
  neighbouring frames of one episode are near duplicates.

Reproducibility: one seed drives the weight init, the shuffling and the augmentation; with one
torch thread (the default) two runs on the same machine and torch version write byte-identical
weights (``test/test_learn_train.py`` checks it on a tiny run).

Rejected: PaliGemma (its Gemma decoder's minimum sensible size and 256-token SigLIP images are far
slower per sample on a CPU for no gain at this scale); a regression or per-dimension
classification head (not an RT-2 model, and the ``local`` backend could not serve it); the
BPE tokenizer of the test models (numbers split into several tokens make answers longer and
training slower).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Special tokens of the word-level tokenizer, in id order.
PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
PROMPT_TEMPLATE = "{image}{prompt}"  # LocalHFBackend's default prompt_template
STATE_PROMPT_TEMPLATE = "{image}{state} {prompt}"  # with the hand state (TrainOptions.state)
REPORT_FILE = "train_report.json"
# A gripper whose measured closedness changes less than this between frames has stopped (relabel_waits).
GRIPPER_SETTLED = 0.01
GRIPPER_MOVED = 0.05  # ... and one that changed this much since the command has started moving
N_BINS = 256
# The dataset's camera names (rt2_ros.learn.dataset.Frame.images), main camera first.
DEFAULT_CAMERAS = ("camera", "wrist_camera")


class TrainError(RuntimeError):
    """A user-facing problem with the training input or options (empty dataset, bad option)."""


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of the LLaVA built from scratch (px, tokens, layers)."""

    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_intermediate: int = 256

    def check(self) -> None:
        if self.image_size % self.patch_size:
            raise TrainError(f"--image-size {self.image_size} must be a multiple of --patch-size {self.patch_size}")
        for name, hidden, heads in (("vision", self.vision_hidden, self.vision_heads),
                                    ("text", self.text_hidden, self.text_heads)):
            if hidden % heads:
                raise TrainError(f"{name} hidden size {hidden} must be a multiple of its {heads} heads")

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TrainOptions:
    """Optimisation settings (everything that, with the data and the seed, fixes the weights)."""

    epochs: float = 10.0
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    bin_sigma: float = 1.0  # bins; 0 = one-hot targets for the motion dimensions too
    augment: bool = True
    val_fraction: float = 0.1
    relabel_waits: bool = True
    seed: int = 0
    threads: int = 1
    cameras: tuple[str, ...] = DEFAULT_CAMERAS
    state: bool = False  # the hand state in the prompt (STATE_PROMPT_TEMPLATE, local_hf.state_text)

    @property
    def prompt_template(self) -> str:
        return STATE_PROMPT_TEMPLATE if self.state else PROMPT_TEMPLATE


@dataclass
class EncodedData:
    """Frames ready for the model: uint8 images, token ids, and the episode each frame came from."""

    images: np.ndarray  # (N, n_cameras, S, S, 3) uint8
    prompt_index: np.ndarray  # (N,) index into prompts (one per instruction, or per frame with the state)
    answers: np.ndarray  # (N, 8) int64 bins
    episode: np.ndarray  # (N,) episode index
    prompts: list[list[int]] = field(default_factory=list)  # token ids of each distinct prompt (images expanded)
    instructions: list[str] = field(default_factory=list)
    relabelled: int = 0  # frames whose label is the action after an arm wait


# ---------------------------------------------------------------------------------------------------- building
def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise TrainError(f"rt2-train needs torch and transformers ({exc.name} is missing): "
                         f"pip install -r requirements-local.txt") from None
    return torch, transformers


def prompt_words(instructions: Iterable[str]) -> list[str]:
    """The word-level vocabulary (besides specials and numbers) that the RT-2 prompts of ``instructions`` use."""
    from tokenizers import pre_tokenizers

    from rt2_ros.tokens import ActionTokenizer

    splitter = pre_tokenizers.Whitespace()
    action_tokenizer = ActionTokenizer.from_profile("rt2")
    words: set[str] = set()
    for instruction in instructions:
        words.update(w for w, _ in splitter.pre_tokenize_str(action_tokenizer.prompt(instruction)))
    numbers = {str(i) for i in range(N_BINS)}
    return sorted(words - numbers)


def build_tokenizer(instructions: Iterable[str]):
    """A ``PreTrainedTokenizerFast`` (word level): specials, the numbers 0..255 as one token each, the prompt words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in [str(i) for i in range(N_BINS)] + prompt_words(instructions):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
                                 extra_special_tokens={"image_token": IMAGE})
    hf.add_special_tokens({"additional_special_tokens": [IMAGE]})
    if hf.convert_tokens_to_ids(IMAGE) != SPECIAL_TOKENS.index(IMAGE):
        raise RuntimeError("tokenizer: the image token did not get its fixed id")
    return hf


def build_processor(tokenizer, spec: ModelSpec):
    from transformers import LlavaProcessor

    try:  # the PIL image processor: torchvision is not part of the optional extra
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor
    size = spec.image_size
    image_processor = ImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token=IMAGE)


def build_model(tokenizer, spec: ModelSpec):
    """A randomly initialised LLaVA (torch's global RNG: seed it first)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    spec.check()
    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                              image_size=spec.image_size, patch_size=spec.patch_size,
                              projection_dim=spec.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.text_hidden,
                       intermediate_size=spec.text_intermediate, num_hidden_layers=spec.text_layers,
                       num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_heads,
                       max_position_embeddings=512, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------------------------------------------- data
def load_dataset(root: Path) -> list:
    """Episodes of a LeRobot dataset written by ``rt2-collect`` (rt2_ros.learn.dataset.read_lerobot)."""
    from rt2_ros.learn.dataset import read_lerobot

    if not Path(root).exists():
        raise TrainError(f"--data: no dataset at {root} (write one with rt2-collect)")
    episodes = list(read_lerobot(Path(root)))
    if not episodes:
        raise TrainError(f"--data: {root} holds no episodes")
    return episodes


def _resize(frame: np.ndarray, size: int, camera: str) -> np.ndarray:
    """A frame as the processor sees it (shortest edge ``size``, centre crop), uint8."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise TrainError(f"camera {camera!r}: frames must be uint8 HxWx3, got {frame.dtype} {frame.shape}")
    if frame.shape[:2] == (size, size):
        return frame
    from PIL import Image

    h, w = frame.shape[:2]
    scale = size / min(h, w)
    # bicubic to the shortest edge, as CLIPImageProcessor's resize, then the centre crop
    img = Image.fromarray(frame).resize((max(size, round(w * scale)), max(size, round(h * scale))),
                                        Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def relabel_waits(bins: np.ndarray, gripper: np.ndarray | None = None,
                  settled: float = GRIPPER_SETTLED) -> tuple[np.ndarray, int]:
    """The episode's (T, 8) bins with every *wait* that a single image cannot explain labelled with the action
    that follows it; and how many frames were relabelled.

    The reference policy waits with its arm still (translation bins 127/128): for the lagging arm to
    reach the target it has commanded, before its next phase (an *arm wait*), and for a fixed time
    after it commands the gripper (a *gripper wait*). From one image a memoryless model cannot tell
    the last frames of such a wait from the frame on which the demonstrator moves on, so copying them
    teaches it to stop there, and a stopped arm shows the same image again: it stays stopped (measured
    on a dev run: the arm parked above the cube, then holding the grasped cube, 1-2/10 successes).
    Arm waits are relabelled whole. Of a gripper wait, the frames until the fingers have moved (measured
    closedness ``gripper``, state[7]) and stopped again (a change below ``settled`` from the frame
    before) keep their label: the arm must hold still until the fingers have closed or opened; the
    rest are relabelled. Without ``gripper`` gripper waits are kept whole.
    """
    bins = np.asarray(bins, dtype=np.int64)
    out = bins.copy()
    still = np.all(np.abs(bins[:, 1:4] - 127.5) <= 1.0, axis=1) & (bins[:, 0] == 0)
    n, t = 0, 0
    while t < len(bins):
        if not still[t]:
            t += 1
            continue
        start = t
        while t < len(bins) and still[t] and bins[t, 7] == bins[start, 7]:
            t += 1
        if t == len(bins):  # nothing follows (an episode cut short): nothing to relabel with
            break
        first = start
        if start > 0 and bins[start, 7] != bins[start - 1, 7]:  # a gripper wait
            if gripper is None:
                continue
            first = start + 1  # the fingers start moving some frames after the command ...
            while first < t and abs(float(gripper[first]) - float(gripper[start])) < GRIPPER_MOVED:
                first += 1
            while first < t and abs(float(gripper[first]) - float(gripper[first - 1])) >= settled:
                first += 1  # ... and the wait is needed until they stop
        if first < t:
            out[first:t] = bins[t]
            n += t - first
    return out, n


def prompt_text(instruction: str, n_images: int, state: str | None = None) -> str:
    """The text LocalHFBackend gives the processor for ``instruction``: its default prompt_template, or with
    ``state`` (:func:`~rt2_ros.backends.local_hf.state_text`) STATE_PROMPT_TEMPLATE."""
    from rt2_ros.tokens import ActionTokenizer

    prompt = ActionTokenizer.from_profile("rt2").prompt(instruction)
    template = PROMPT_TEMPLATE if state is None else STATE_PROMPT_TEMPLATE.replace("{state}", state)
    return template.replace("{image}", IMAGE * n_images).replace("{prompt}", prompt)


def frame_state_text(frame) -> str:
    """The {state} of a dataset frame: its observation.state's position and gripper closedness."""
    from rt2_ros.backends.local_hf import state_text

    st = np.asarray(frame.state, dtype=np.float64).reshape(-1)
    return state_text(st[:3], float(st[7]))


def encode_episodes(episodes: Sequence, processor, spec: ModelSpec, cameras: Sequence[str],
                    relabel: bool = False, state: bool = False) -> EncodedData:
    """Every frame of ``episodes`` as model input (images resized once, prompts tokenized by the processor);
    ``relabel``: arm waits carry the action after them (:func:`relabel_waits`); ``state``: each frame's
    prompt carries its hand state (:func:`frame_state_text`)."""
    from PIL import Image

    frames = [(i, ep, fr) for i, ep in enumerate(episodes) for fr in ep.frames]
    if not frames:
        raise TrainError("the dataset has episodes but no frames")
    instructions = sorted({ep.instruction for ep in episodes})
    blank = [Image.new("RGB", (spec.image_size, spec.image_size))] * len(cameras)
    prompts = []
    for instruction in instructions:  # the processor expands each image placeholder to its image tokens
        out = processor(text=prompt_text(instruction, len(cameras), "0 0 0 0" if state else None),
                        images=blank if len(blank) > 1 else blank[0])
        prompts.append([int(t) for t in out["input_ids"][0]])
    index = {s: i for i, s in enumerate(instructions)}
    if state:  # one prompt per frame: the instruction's, with the frame's 4 state numbers put in
        number_id = processor.tokenizer.convert_tokens_to_ids
        zero = number_id("0")
        slots = [[k for k, t in enumerate(p) if t == zero] for p in prompts]
        if any(len(s) != 4 for s in slots):
            raise TrainError("the state's 4 numbers could not be found in the tokenized prompt")
        per_frame = []
        for _, ep, fr in frames:
            ids = list(prompts[index[ep.instruction]])
            for k, word in zip(slots[index[ep.instruction]], frame_state_text(fr).split(), strict=True):
                ids[k] = number_id(word)
            per_frame.append(ids)
    images = np.empty((len(frames), len(cameras), spec.image_size, spec.image_size, 3), dtype=np.uint8)
    answers = np.empty((len(frames), 8), dtype=np.int64)
    for k, (_, ep, fr) in enumerate(frames):
        for c, name in enumerate(cameras):
            if name not in fr.images:
                raise TrainError(f"episode seed {ep.seed}: no {name!r} image in a frame (it has "
                                 f"{sorted(fr.images)}); choose --cameras from those")
            images[k, c] = _resize(np.asarray(fr.images[name]), spec.image_size, name)
        tokens = np.asarray(fr.action_tokens, dtype=np.int64).reshape(-1)
        if tokens.shape != (8,) or tokens.min() < 0 or tokens.max() >= N_BINS:
            raise TrainError(f"episode seed {ep.seed}: action_tokens must be 8 bins in 0..255, got {tokens.tolist()}")
        answers[k] = tokens
    relabelled = 0
    if relabel:
        start = 0
        for ep in episodes:
            end = start + len(ep.frames)
            gripper = np.array([float(np.asarray(f.state).reshape(-1)[7]) for f in ep.frames])
            answers[start:end], n = relabel_waits(answers[start:end], gripper)
            relabelled += n
            start = end
    if state:
        prompt_index, prompts = np.arange(len(frames)), per_frame
    else:
        prompt_index = np.array([index[ep.instruction] for _, ep, _ in frames])
    return EncodedData(images=images, prompt_index=prompt_index, answers=answers,
                       episode=np.array([i for i, _, _ in frames]), prompts=prompts,
                       instructions=instructions, relabelled=relabelled)


class Batcher:
    """Turns frame indices into model tensors (right-padded; loss targets on the answer only)."""

    def __init__(self, data: EncodedData, processor, tokenizer, augment: bool) -> None:
        torch, _ = _import_torch()
        self.torch = torch
        self.data = data
        self.augment = augment
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.rescale = float(ip.rescale_factor)
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.number_ids = torch.tensor(tokenizer.convert_tokens_to_ids([str(i) for i in range(N_BINS)]))

    def __call__(self, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict[str, Any]:
        torch, d = self.torch, self.data
        answers = torch.from_numpy(d.answers[idx])
        answer_ids = torch.cat([self.number_ids[answers], torch.full((len(idx), 1), self.eos_id)], dim=1)
        prompts = [d.prompts[int(p)] for p in d.prompt_index[idx]]
        length = max(len(p) for p in prompts) + answer_ids.shape[1]
        input_ids = torch.full((len(idx), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), length), dtype=torch.long)
        answer_pos = torch.empty((len(idx), answer_ids.shape[1]), dtype=torch.long)
        for r, p in enumerate(prompts):
            n = len(p)
            input_ids[r, :n] = torch.tensor(p)
            input_ids[r, n:n + answer_ids.shape[1]] = answer_ids[r]
            attention[r, :n + answer_ids.shape[1]] = 1
            answer_pos[r] = torch.arange(n, n + answer_ids.shape[1])
        imgs = torch.from_numpy(d.images[idx]).float()  # (B, C, S, S, 3)
        if self.augment and rng is not None:  # brightness/contrast jitter per image
            shape = (imgs.shape[0], imgs.shape[1], 1, 1, 1)
            gain = torch.from_numpy(rng.uniform(0.85, 1.15, shape).astype(np.float32))
            offset = torch.from_numpy(rng.uniform(-12.0, 12.0, shape).astype(np.float32))
            imgs = (imgs * gain + offset).clamp(0.0, 255.0)
        pixels = imgs.flatten(0, 1).permute(0, 3, 1, 2) * self.rescale  # (B*C, 3, S, S), as the processor does
        pixels = (pixels - self.mean) / self.std
        return {"input_ids": input_ids, "attention_mask": attention, "pixel_values": pixels,
                "answer_pos": answer_pos, "answer_ids": answer_ids, "answers": answers}


def soft_targets(answers, number_ids, eos_id: int, vocab: int, sigma: float):
    """(B, 9, vocab) target distributions: one-hot for terminate, gripper and EOS; a Gaussian over
    neighbouring bins (sigma in bins) for the six motion dimensions."""
    import torch

    b = answers.shape[0]
    targets = torch.zeros((b, 9, vocab))
    bins = torch.arange(N_BINS, dtype=torch.float32)
    for dim in range(8):
        if sigma > 0 and 1 <= dim <= 6:
            w = torch.exp(-0.5 * ((bins.view(1, -1) - answers[:, dim:dim + 1].float()) / sigma) ** 2)
            w = w / w.sum(dim=1, keepdim=True)
            targets[:, dim, number_ids] = w
        else:
            targets[torch.arange(b), dim, number_ids[answers[:, dim]]] = 1.0
    targets[:, 8, eos_id] = 1.0
    return targets


def answer_logits(model, batch: dict[str, Any]):
    """Logits that predict each answer token (the position before it), (B, 9, vocab)."""
    import torch

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"])
    pos = batch["answer_pos"] - 1
    return out.logits[torch.arange(pos.shape[0]).unsqueeze(1), pos]


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    out: Path
    train_frames: int
    val_frames: int
    steps: int
    seconds: float
    final_loss: float
    val: dict[str, Any]
    parameters: int
    checkpoint_bytes: int


def split_episodes(n_episodes: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Episode indices (train, held-out): the last ``val_fraction`` of the episodes (at least one, if there
    are two or more) are held out."""
    if not 0.0 <= val_fraction < 1.0:
        raise TrainError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = min(n_episodes - 1, max(1, round(n_episodes * val_fraction))) if val_fraction > 0 else 0
    n_val = max(0, n_val)
    return np.arange(n_episodes - n_val), np.arange(n_episodes - n_val, n_episodes)


def evaluate_tokens(model, batcher: Batcher, idx: np.ndarray, batch_size: int = 128) -> dict[str, Any]:
    """Teacher-forced held-out accuracy: per dimension, all 8 at once, and within +-2 bins (motion dims)."""
    import torch

    if len(idx) == 0:
        return {"frames": 0}
    correct = torch.zeros(8)
    near = torch.zeros(8)
    exact_all = 0
    loss_sum = 0.0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(idx), batch_size):
            batch = batcher(idx[start:start + batch_size])
            logits = answer_logits(model, batch)
            loss_sum += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["answer_ids"].flatten(),
                                                                reduction="sum"))
            # the answer among number tokens only (what constrained decoding allows)
            pred = logits[:, :8, batcher.number_ids].argmax(-1)
            truth = batch["answers"]
            hit = pred == truth
            correct += hit.float().sum(0)
            near += ((pred - truth).abs() <= 2).float().sum(0)
            exact_all += int(hit.all(1).sum())
    model.train()
    n = len(idx)
    names = ("terminate", "dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
    return {"frames": n, "loss": loss_sum / (9 * n), "token_accuracy": float(correct.sum() / (8 * n)),
            "action_exact": exact_all / n,
            "per_dim_accuracy": {k: round(float(v / n), 4) for k, v in zip(names, correct, strict=True)},
            "per_dim_within_2_bins": {k: round(float(v / n), 4) for k, v in zip(names, near, strict=True)}}


def train(data_episodes: Sequence, out: Path, spec: ModelSpec = ModelSpec(), opts: TrainOptions = TrainOptions(),
          log=print, data_label: str = "") -> TrainResult:
    """Train on ``data_episodes`` (rt2_ros.learn.dataset.Episode) and save the checkpoint in ``out``."""
    torch, transformers = _import_torch()
    spec.check()
    if not data_episodes:
        raise TrainError("no episodes to train on")
    if opts.epochs <= 0 or opts.batch_size <= 0:
        raise TrainError("--epochs and --batch-size must be positive")
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    rng = np.random.default_rng(opts.seed)

    tokenizer = build_tokenizer(ep.instruction for ep in data_episodes)
    processor = build_processor(tokenizer, spec)
    model = build_model(tokenizer, spec)
    n_params = sum(p.numel() for p in model.parameters())
    data = encode_episodes(data_episodes, processor, spec, opts.cameras, opts.relabel_waits, opts.state)
    train_eps, val_eps = split_episodes(len(data_episodes), opts.val_fraction)
    train_idx = np.flatnonzero(np.isin(data.episode, train_eps))
    val_idx = np.flatnonzero(np.isin(data.episode, val_eps))
    batcher = Batcher(data, processor, tokenizer, opts.augment)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / opts.batch_size))
    total_steps = max(1, round(opts.epochs * steps_per_epoch))
    log(f"rt2-train: {len(data_episodes)} episodes{data_label}; {len(train_idx)} training frames, {len(val_idx)} "
        f"held-out frames ({len(val_eps)} episodes), {data.relabelled} arm-wait frames relabelled; LLaVA "
        f"{n_params / 1e6:.2f} M parameters, {spec.image_tokens} "
        f"image tokens x {len(opts.cameras)} cameras ({', '.join(opts.cameras)}); {total_steps} steps of "
        f"{opts.batch_size} ({opts.epochs:g} epochs), seed {opts.seed}, {opts.threads} thread(s)")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 5% of the peak
        if step < opts.warmup_steps:
            return opts.lr * (step + 1) / opts.warmup_steps
        t = (step - opts.warmup_steps) / max(1, total_steps - opts.warmup_steps)
        return opts.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))

    vocab = len(tokenizer)
    model.train()
    t0 = time.monotonic()
    step, order, cursor = 0, np.empty(0, dtype=np.int64), 0
    ema = float("nan")
    history = []
    log_every = max(1, min(200, total_steps // 20))
    while step < total_steps:
        if cursor >= len(order):
            order, cursor = rng.permutation(train_idx), 0
        idx = order[cursor:cursor + opts.batch_size]
        cursor += opts.batch_size
        batch = batcher(idx, rng)
        logits = answer_logits(model, batch)
        targets = soft_targets(batch["answers"], batcher.number_ids, batcher.eos_id, vocab, opts.bin_sigma)
        loss = -(targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        value = float(loss.detach())
        ema = value if math.isnan(ema) else 0.98 * ema + 0.02 * value
        if step % log_every == 0 or step == total_steps:
            elapsed = time.monotonic() - t0
            history.append({"step": step, "loss": round(ema, 5), "seconds": round(elapsed, 1)})
            log(f"rt2-train: step {step}/{total_steps} loss {ema:.4f} ({step * opts.batch_size / elapsed:.0f} "
                f"samples/s, {elapsed / 60:.1f} min)")
    seconds = time.monotonic() - t0
    val = evaluate_tokens(model, batcher, val_idx)
    if val["frames"]:
        log(f"rt2-train: held-out token accuracy {val['token_accuracy']:.3f} (whole action exact "
            f"{val['action_exact']:.3f}), loss {val['loss']:.4f}; per dimension {val['per_dim_accuracy']}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name != REPORT_FILE)
    report = {
        "model": "LlavaForConditionalGeneration (CLIP vision tower + Llama decoder), trained from scratch",
        "inputs": f"cameras {list(opts.cameras)} + instruction"
                  + ("; hand state (x y z gripper as bins 0..255, local_hf.state_text)" if opts.state
                     else "; no proprioception"),
        "prompt_template": opts.prompt_template, "token_profile": "rt2", "token_form": "text",
        "spec": asdict(spec), "options": {**asdict(opts), "cameras": list(opts.cameras)},
        "data": data_label.strip() or None, "episodes": len(data_episodes),
        "train_frames": len(train_idx), "val_frames": len(val_idx),
        "instructions": data.instructions, "relabelled_wait_frames": data.relabelled, "parameters": n_params,
        "steps": step,
        "train_seconds": round(seconds, 1), "final_loss": round(ema, 5), "loss_history": history,
        "held_out": val, "checkpoint_bytes": size,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": sys.version.split()[0]},
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    log(f"rt2-train: wrote {out}/ ({size / 1e6:.2f} MB) after {seconds / 60:.1f} min of training")
    return TrainResult(out, len(train_idx), len(val_idx), step, seconds, ema, val, n_params, size)


def weights_digest(path: Path) -> str:
    """sha256 of the checkpoint's weights file (reproducibility checks)."""
    h = hashlib.sha256()
    h.update((Path(path) / "model.safetensors").read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- CLI
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    d, s = TrainOptions(), ModelSpec()
    p = argparse.ArgumentParser(prog="rt2-train", description="Train a small RT-2-style LLaVA from scratch on a "
                                "LeRobot dataset (rt2-collect) and save a checkpoint for backend.type: local.")
    p.add_argument("--data", required=True, help="LeRobot dataset directory (rt2-collect --out)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--epochs", type=float, default=d.epochs, help=f"passes over the training frames ({d.epochs:g})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate ({d.lr:g})")
    p.add_argument("--bin-sigma", type=float, default=d.bin_sigma,
                   help="soft-target width over neighbouring bins for the motion dimensions (0 = one-hot)")
    p.add_argument("--no-augment", action="store_true", help="no brightness/contrast jitter")
    p.add_argument("--keep-waits", action="store_true",
                   help="train on the demonstrator's arm waits as they are (default: relabel them, see relabel_waits)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="fraction of episodes held out for the token accuracy")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads (1: byte-identical weights for one seed on one machine)")
    p.add_argument("--cameras", default=",".join(d.cameras),
                   help=f"dataset cameras the model sees, main first ({','.join(d.cameras)})")
    p.add_argument("--state", action="store_true",
                   help="put the hand state (x y z gripper, bins 0..255) in the prompt; serve the checkpoint with "
                        f"backend.local.prompt_template '{STATE_PROMPT_TEMPLATE}'")
    p.add_argument("--max-episodes", type=int, default=0, help="use only the first N episodes (0 = all)")
    p.add_argument("--include-failed", action="store_true",
                   help="also train on episodes the demonstrator failed (default: successful ones only)")
    p.add_argument("--image-size", type=int, default=s.image_size)
    p.add_argument("--patch-size", type=int, default=s.patch_size)
    p.add_argument("--text-layers", type=int, default=s.text_layers)
    p.add_argument("--text-hidden", type=int, default=s.text_hidden)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    cameras = tuple(c.strip() for c in args.cameras.split(",") if c.strip())
    try:
        if not cameras:
            raise TrainError("--cameras: name at least one camera")
        spec = ModelSpec(image_size=args.image_size, patch_size=args.patch_size, text_layers=args.text_layers,
                         text_hidden=args.text_hidden, text_intermediate=2 * args.text_hidden)
        opts = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, bin_sigma=args.bin_sigma,
                            augment=not args.no_augment, relabel_waits=not args.keep_waits,
                            val_fraction=args.val_fraction, seed=args.seed,
                            threads=args.threads, cameras=cameras, state=args.state)
        episodes = load_dataset(Path(args.data))
        if args.max_episodes > 0:
            episodes = episodes[:args.max_episodes]
        label = f" from {args.data}"
        if not args.include_failed:
            kept = [ep for ep in episodes if ep.success]
            if not kept:
                raise TrainError(f"--data: none of the {len(episodes)} episodes in {args.data} succeeded "
                                 f"(--include-failed trains on them anyway)")
            label += f", the {len(kept)} successful of {len(episodes)}"
            episodes = kept
        train(episodes, Path(args.out), spec, opts, data_label=label)
    except TrainError as exc:
        print(f"rt2-train: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rt2-train: interrupted; no checkpoint written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
