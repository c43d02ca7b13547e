"""Prompt tokenization and encoding, as FLUX uses its two text encoders.

FLUX conditions on (docs/model-reference.md, "Text encoders"):
* `txt` (B, L, 4096): T5 v1.1 XXL `last_hidden_state`; the prompt is tokenized with T5's
  sentencepiece tokenizer (appends </s> = 1), truncated and padded with <pad> = 0 to exactly
  `max_sequence_length` tokens (512 for dev, 256 for schnell). No attention mask: the pad
  tokens are encoded and attended to.
* `vec` (B, 768): CLIP-L `pooler_output`; the prompt is tokenized with CLIP's BPE tokenizer
  (<|startoftext|> ... <|endoftext|>), truncated and padded with <|endoftext|> to 77 tokens.

The tokenizers are transformers' own (`CLIPTokenizer`, `T5TokenizerFast`), loaded from the
hub's `tokenizer/` and `tokenizer_2/` folders, and called exactly as diffusers' FluxPipeline
calls them (`padding="max_length", max_length=..., truncation=True`), so the ids are the same.
Unlike diffusers, a truncation warning says which prompt was cut and by how many tokens.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import numpy as np

from fluxjax.errors import UsageError
from fluxjax.parallel.strategies import jit_with_rules

CLIP_MAX_LENGTH = 77


def decode_line(raw: bytes, where: str) -> str:
    """One line of a text file the user wrote (a prompts file, a caption, metadata.jsonl) as text;
    UsageError "FILE:LINE: ..." unless it is UTF-8 (Python's own error names neither)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{where}: not valid UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                         "save the file as UTF-8") from None


def check_prompt(name: str, prompt) -> None:
    """Raise UsageError naming `name` unless `prompt` is a str that UTF-8 can encode.

    Bytes that are not UTF-8 reach Python as lone surrogates (command-line arguments are decoded
    with surrogateescape): the tokenizers and the PNG's UTF-8 text chunks would fail on them.
    """
    if not isinstance(prompt, str):
        raise UsageError(f"{name} must be a string, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = prompt[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise UsageError(f"{name} is not valid UTF-8 text ({byte} at character {e.start + 1})") from None


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than its encoder's token budget; its end was cut off."""


def _as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given: expected a string or a non-empty list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__}, expected a string")
    return prompts


def _short(prompt: str, n: int = 60) -> str:
    return prompt if len(prompt) <= n else prompt[: n - 3] + "..."


class PromptTokenizer:
    """FLUX's two tokenizers: prompts -> (t5_ids (B, L) int32, clip_ids (B, 77) int32).

    Build with `PromptTokenizer.from_folder(root)`, root holding the hub's `tokenizer/` (CLIP:
    vocab.json + merges.txt) and `tokenizer_2/` (T5: spiece.model and/or tokenizer.json), or
    from two loaded transformers tokenizers.
    """

    def __init__(self, clip_tokenizer: Any, t5_tokenizer: Any, clip_length: int | None = None):
        self.clip = clip_tokenizer
        self.t5 = t5_tokenizer
        if clip_length is None:
            # diffusers uses the tokenizer's model_max_length (77 in the hub's tokenizer_config);
            # a tokenizer without one reports a huge sentinel value.
            n = getattr(clip_tokenizer, "model_max_length", None)
            clip_length = int(n) if isinstance(n, int) and 0 < n < 100_000 else CLIP_MAX_LENGTH
        self.clip_length = clip_length

    @classmethod
    def from_folder(cls, root: str | os.PathLike) -> "PromptTokenizer":
        """Load `root/tokenizer` (CLIPTokenizer) and `root/tokenizer_2` (T5TokenizerFast), offline."""
        from transformers import CLIPTokenizer, T5TokenizerFast

        root = os.fspath(root)
        folders = {name: os.path.join(root, name) for name in ("tokenizer", "tokenizer_2")}
        for name, path in folders.items():
            if not os.path.isdir(path):
                raise FileNotFoundError(
                    f"{path}: no such folder; {root} should hold the hub's tokenizer/ (CLIP) and tokenizer_2/ (T5)"
                )
        clip = CLIPTokenizer.from_pretrained(folders["tokenizer"], local_files_only=True)
        t5 = T5TokenizerFast.from_pretrained(folders["tokenizer_2"], local_files_only=True)
        return cls(clip, t5)

    def tokenize_t5(self, prompts: str | Sequence[str], max_sequence_length: int) -> np.ndarray:
        """T5 ids (B, max_sequence_length) int32: </s> appended, truncated, padded with <pad>."""
        ids, cuts = self._t5(_as_prompt_list(prompts), max_sequence_length)
        _warn(cuts)
        return ids

    def tokenize_clip(self, prompts: str | Sequence[str]) -> np.ndarray:
        """CLIP ids (B, 77) int32: <|startoftext|> ... <|endoftext|>, truncated, padded with <|endoftext|>."""
        ids, cuts = self._clip(_as_prompt_list(prompts))
        _warn(cuts)
        return ids

    def __call__(self, prompts: str | Sequence[str], max_sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
        """(t5_ids (B, max_sequence_length) int32, clip_ids (B, 77) int32) for a prompt or a batch.

        A prompt longer than a budget is cut at its end (the end token is kept) and a
        PromptTruncatedWarning names the encoder, the prompt's index and text, and the count cut.
        """
        prompts = _as_prompt_list(prompts)
        t5_ids, t5_cuts = self._t5(prompts, max_sequence_length)
        clip_ids, clip_cuts = self._clip(prompts)
        _warn(t5_cuts + clip_cuts)
        return t5_ids, clip_ids

    def _t5(self, prompts: list[str], max_sequence_length: int) -> tuple[np.ndarray, list[str]]:
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, (int, np.integer)) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}")
        return _tokenize(self.t5, "T5", prompts, int(max_sequence_length), "max_sequence_length")

    def _clip(self, prompts: list[str]) -> tuple[np.ndarray, list[str]]:
        return _tokenize(self.clip, "CLIP", prompts, self.clip_length, "CLIP's context length")


def _tokenize(tokenizer, which: str, prompts: list[str], length: int, limit: str) -> tuple[np.ndarray, list[str]]:
    """ids (B, length) int32 exactly as FluxPipeline asks its tokenizers, and one message per cut prompt."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=length,
        truncation=True,
        return_length=False,
        return_overflowing_tokens=False,
        return_tensors="np",
    ).input_ids
    if ids.shape != (len(prompts), length):
        raise AssertionError(f"{which} tokenizer returned shape {ids.shape}, expected {(len(prompts), length)}")
    # Full lengths (special tokens included) tell how many tokens truncation removed.
    full = tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
    cuts = [
        f"{which} prompt {i} ({_short(prompt)!r}) is {len(row)} tokens long; its last {len(row) - length} "
        f"token(s) were cut to fit {limit} = {length}"
        for i, (prompt, row) in enumerate(zip(prompts, full))
        if len(row) > length
    ]
    return ids.astype(np.int32), cuts


def _warn(messages: list[str]) -> None:
    for message in messages:
        warnings.warn(message, PromptTruncatedWarning, stacklevel=3)  # at the caller of the public method


def encode_prompts(t5_model, t5_params, clip_model, clip_params, t5_ids, clip_ids, dtype=None):
    """Token ids -> FLUX's text conditioning (txt, vec).

    t5_model / clip_model: the linen modules (fluxjax.models.t5 encoder, CLIPTextEncoder);
    t5_params / clip_params: their parameter trees; t5_ids (B, L) and clip_ids (B, 77) int32
    from PromptTokenizer. The T5 encoder's apply must return its last hidden state (B, L, 4096)
    (or a tuple whose first element it is).
    Returns txt (B, L, 4096) and vec (B, 768) (CLIP pooler_output), each in its encoder's
    compute dtype, or in `dtype` when given (BFL casts both to bf16).

    Under `Strategy.activate(mesh)` the activations are constrained as the strategy says.

    Pure and jit-friendly: the ids and params are arguments, the modules static, e.g.
    `jax.jit(encode_prompts, static_argnums=(0, 2, 6))`; `encode_prompts_jit` is that, keyed on
    the active strategy too.
    """
    txt = t5_model.apply({"params": t5_params}, t5_ids)
    if isinstance(txt, (tuple, list)):
        txt = txt[0]
    _, vec = clip_model.apply({"params": clip_params}, clip_ids)
    if dtype is not None:
        txt, vec = txt.astype(dtype), vec.astype(dtype)
    return txt, vec


encode_prompts_jit = jit_with_rules(encode_prompts, static_argnames=("t5_model", "clip_model", "dtype"))
