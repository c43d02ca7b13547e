"""Qwen3 prompt tokenization for FLUX.2 [klein] (on the host), and a tiny Qwen3-style tokenizer.

`tokenize(tokenizer, prompts, max_sequence_length)` does what diffusers'
Flux2KleinPipeline._get_qwen3_prompt_embeds does before the encoder: each prompt becomes the
one user message of a chat, rendered by the tokenizer's chat template with
add_generation_prompt=True and enable_thinking=False (Qwen3's template then ends with an empty
think block), and that text is tokenized with padding to exactly max_sequence_length and
truncation. The tokenizer is transformers' own (the hub's klein tokenizer/ folder,
`Qwen2TokenizerFast`), so ids and mask are the ones diffusers feeds the encoder.

`make_tokenizer(folder)` writes a tokenizer of that kind, learnt locally in well under a second
(no download): byte-level BPE with Qwen2's pre-tokenizer, the special tokens the chat uses, and
a minimal chat template of the same structure as Qwen3's:
  <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import numpy as np

from fluxjax.errors import UsageError

PAD = "<|endoftext|>"  # Qwen's pad (and eos) token
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
KLEIN_MAX_SEQUENCE_LENGTH = 512  # diffusers' max_sequence_length for klein

# Qwen3's template reduced to what klein's call reaches: user/assistant turns, the generation
# prompt, and the empty think block enable_thinking=False adds to it.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def chat_text(tokenizer: Any, prompt: str) -> str:
    """`prompt` as the one user turn of a chat, rendered as diffusers renders it for klein."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


def tokenize(tokenizer: Any, prompts: str | Sequence[str],
             max_sequence_length: int = KLEIN_MAX_SEQUENCE_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), each (B, max_sequence_length) int32, for klein's encoder.

    A chat longer than max_sequence_length tokens is cut at its end (as diffusers does: the cut
    takes the template's closing tokens with it) and a PromptTruncatedWarning says which prompt.
    """
    from fluxjax.pipeline.text import PromptTruncatedWarning, _as_prompt_list, _short

    check_chat_tokenizer(tokenizer, max_sequence_length, "klein's Qwen3 tokenizer")
    ids, masks = [], []
    for i, prompt in enumerate(_as_prompt_list(prompts)):
        text = chat_text(tokenizer, prompt)
        out = tokenizer(text, padding="max_length", truncation=True, max_length=int(max_sequence_length),
                        return_tensors="np")
        full = len(tokenizer(text, truncation=False)["input_ids"])
        if full > max_sequence_length:
            warnings.warn(f"Qwen3 prompt {i} ({_short(prompt)!r}) is {full} tokens long with its chat template; "
                          f"its last {full - max_sequence_length} token(s) were cut to fit max_sequence_length = "
                          f"{max_sequence_length}", PromptTruncatedWarning, stacklevel=2)
        ids.append(out["input_ids"][0])
        masks.append(out["attention_mask"][0])
    return np.stack(ids).astype(np.int32), np.stack(masks).astype(np.int32)


def check_chat_tokenizer(tokenizer: Any, max_sequence_length: int, what: str) -> None:
    """UsageError (one line) unless max_sequence_length is a positive integer and `tokenizer` (a
    tokenizer or processor) has a chat template; `what` names the tokenizer the model ships."""
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, (int, np.integer)) \
            or max_sequence_length < 1:
        raise UsageError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise UsageError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: no chat template; {what} "
                         "has one (tokenizer_config.json or chat_template.jinja)")


def learn_bpe(corpus: Sequence[str] | None = None, num_merges: int = 200, special_tokens: Sequence[str] = ()):
    """A `tokenizers` byte-level BPE learnt on `corpus` (default fluxjax.pipeline.tiny_tokenizers.CORPUS)
    with Qwen2's pre-tokenizer: the 256 byte symbols, `num_merges` merges, and `special_tokens`
    first (ids 0, 1, ...) when given.

    The Split below gets the regex as a str, which `tokenizers` matches literally: training sees
    no word boundaries (merges may span a space). Kept as it is because the Qwen3 tests' ids come
    from it (Qwen2Tokenizer puts Qwen2's real pre-tokenizer back in use); the tiny Mistral
    tokenizer keeps it as trained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from fluxjax.pipeline.tiny_tokenizers import CORPUS

    corpus = list(CORPUS if corpus is None else corpus)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(PRETOKENIZE_REGEX, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(special_tokens) + len(alphabet) + num_merges,
                                  initial_alphabet=alphabet, special_tokens=list(special_tokens), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    return bpe


def make_tokenizer(folder: str | os.PathLike, corpus: Sequence[str] | None = None, num_merges: int = 200):
    """Write a tiny Qwen2-style tokenizer to `folder` (transformers' save_pretrained layout) and
    return it: byte-level BPE learnt on `corpus` (default fluxjax.pipeline.tiny_tokenizers.CORPUS) with
    Qwen2's pre-tokenizer, then <|endoftext|> (pad, eos), <|im_start|>, <|im_end|> (special) and
    <think>, </think> (added, not special, as in Qwen3), and CHAT_TEMPLATE. About 500 ids."""
    import json

    from transformers import Qwen2Tokenizer

    learnt = json.loads(learn_bpe(corpus, num_merges).to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=learnt["vocab"], merges=merges, model_max_length=131072)
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.add_tokens([THINK, END_THINK])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(os.fspath(folder))
    return tokenizer
