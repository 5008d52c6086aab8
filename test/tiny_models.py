"""Tiny random-weight transformers models, built offline into a directory, for the local backend tests.

Nothing is downloaded: the tokenizer is trained here with the ``tokenizers`` library on a small
synthetic corpus (prompts and action strings), the models are instantiated from configs with
random weights (seeded) and saved with ``save_pretrained``; the backend then loads them exactly as
it would load a real checkpoint directory.

* :func:`build_tiny_llava` — a real VLM architecture: LLaVA (CLIP vision tower 32x32 px, 8 px
  patches, 16 image tokens; Llama text model, hidden size 32, 2 layers) + ``LlavaProcessor``.
* :func:`build_tiny_causal_lm` — a Llama causal LM with the same tokenizer (text only).

Tokenizer styles: ``numbers`` (SentencePiece-like Metaspace BPE that learns whole-number tokens
such as ``▁128``) and ``digits`` (numbers split into single digits, as LLaMA and Qwen do). The
vocabulary is padded with never-seen filler tokens to ``vocab_size`` ids, so OpenVLA-style
"last 256 ids" action tokens exist and mostly never occur in text.
"""

from __future__ import annotations

import random
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(5)
VOCAB_SIZE = 512
IMAGE_SIZE_PX = 32
PATCH_SIZE_PX = 8

_INSTRUCTIONS = ("pick up the red block", "put the cube in the tray", "open the drawer", "move the apple left",
                 "push the blue button", "stack the green cup on the plate")


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(400):
        n = rng.choice((7, 8))
        lines.append(" ".join(str(rng.randrange(256)) for _ in range(n)))
        task = rng.choice(_INSTRUCTIONS)
        lines.append(f"Q: what action should the robot take to {task}? A:")
        lines.append(f"In: What action should the robot take to {task}?\nOut:")
    return lines


def build_tokenizer(out_dir: str | Path, style: str = "numbers", vocab_size: int = VOCAB_SIZE):
    """Train a tiny tokenizer (offline) and save it as a ``PreTrainedTokenizerFast`` into ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in ("numbers", "digits"):
        raise ValueError(f"unknown tokenizer style {style!r}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if style == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 64, special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(0), trainer)
    fillers = [f"<filler_{i}>" for i in range(vocab_size - tok.get_vocab_size())]
    tok.add_tokens(fillers)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    if len(hf) != vocab_size or hf.convert_tokens_to_ids("<image>") != IMAGE_ID:
        raise RuntimeError(f"tiny tokenizer came out wrong: {len(hf)} ids")
    hf.save_pretrained(str(out_dir))
    return hf


def _llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)


def _randomise(model, seed: int, std: float) -> None:
    """Re-draw every weight from N(0, std) so different seeds give clearly different greedy answers
    (the default init leaves tiny models with near-uniform logits)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_tiny_llava(out_dir: str | Path, seed: int = 0, tokenizer_style: str = "numbers") -> Path:
    """A random-weight LLaVA (+ processor and tokenizer) saved in ``out_dir``; returns the path."""
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    try:  # the PIL image processor: torchvision is not part of the optional extra
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = build_tokenizer(out, tokenizer_style)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=IMAGE_SIZE_PX, patch_size=PATCH_SIZE_PX, projection_dim=16)
    config = LlavaConfig(vision_config=vision, text_config=_llama_config(len(hf)), image_token_id=IMAGE_ID,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    _randomise(model, seed, std=0.5)
    model.save_pretrained(str(out))
    image_processor = ImageProcessor(size={"shortest_edge": IMAGE_SIZE_PX},
                                     crop_size={"height": IMAGE_SIZE_PX, "width": IMAGE_SIZE_PX})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=hf, patch_size=PATCH_SIZE_PX,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>")
    processor.save_pretrained(str(out))
    return out


def build_tiny_causal_lm(out_dir: str | Path, seed: int = 0, tokenizer_style: str = "numbers") -> Path:
    """A random-weight Llama causal LM (+ tokenizer) saved in ``out_dir``; returns the path."""
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = build_tokenizer(out, tokenizer_style)
    model = LlamaForCausalLM(_llama_config(len(hf)))
    _randomise(model, seed, std=0.5)
    model.save_pretrained(str(out))
    return out
