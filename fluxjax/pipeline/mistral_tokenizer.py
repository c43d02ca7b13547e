"""Mistral prompt tokenization for FLUX.2 [dev] (on the host), and a tiny Mistral-style tokenizer.

`tokenize(processor, prompts, max_sequence_length)` does what diffusers'
Flux2Pipeline._get_mistral_3_small_prompt_embeds does before the encoder: each prompt (with any
"[IMG]" taken out, as diffusers' format_input does) becomes a chat of two messages, BFL's system
message and the prompt as the user's, in the content-list form ([{"type": "text", "text": ...}]);
the batch goes through the processor's own apply_chat_template with add_generation_prompt=False,
padding to exactly max_sequence_length and truncation. The processor is transformers' own (the
hub's FLUX.2-dev tokenizer/ folder, `PixtralProcessor`, loaded with AutoProcessor as diffusers
does), so ids and mask are the ones diffusers feeds the encoder. Mistral-Small-3.1's template
renders such a chat as
  <s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]{prompt}[/INST]

`make_tokenizer(folder)` writes a tokenizer for that call, learnt locally in well under a second
(no download): a tiny byte-level BPE (learnt as the Qwen3 one, qwen3_tokenizer.learn_bpe) with
Mistral's special tokens and a minimal chat template of the structure above. It is the tokenizer
alone, not a PixtralProcessor around it: transformers' PixtralProcessor needs torchvision, which
neither fluxjax nor its tests install. For text the two give the same ids: the processor's
apply_chat_template renders the same template and, the text starting with the BOS, tokenizes it
without adding special tokens, as a tokenizer's apply_chat_template always does.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import numpy as np

from fluxjax.pipeline.qwen3_tokenizer import check_chat_tokenizer, learn_bpe

FLUX2_DEV_MAX_SEQUENCE_LENGTH = 512  # Flux2Pipeline's max_sequence_length

# BFL's system message for FLUX.2 [dev] text-to-image (flux2's system_messages.py SYSTEM_MESSAGE,
# diffusers' pipelines/flux2/system_messages.py): part of every chat, so of every embedding.
SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                  "object relationships, object\nattribution and actions without speculation.")

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
INST, END_INST = "[INST]", "[/INST]"
IMG, IMG_BREAK, IMG_END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
SYSTEM_PROMPT, END_SYSTEM_PROMPT = "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"
# In Mistral's order (<unk> 0, <s> 1, </s> 2, ...), though not at Tekken's ids.
SPECIAL_TOKENS = (UNK, BOS, EOS, INST, END_INST, IMG, PAD, IMG_BREAK, IMG_END, SYSTEM_PROMPT, END_SYSTEM_PROMPT)

# Mistral-Small-3.1's template reduced to what Flux2Pipeline's call reaches: the BOS, a system
# message, user turns; text blocks of a content list are joined, image blocks become [IMG].
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = namespace(s='') %}"
    "{%- for block in message['content'] %}"
    "{%- set text.s = text.s + (block['text'] if block['type'] == 'text' else '[IMG]') %}"
    "{%- endfor %}{%- set text = text.s %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def chats(prompts: Sequence[str], system_message: str = SYSTEM_MESSAGE) -> list[list[dict]]:
    """Flux2Pipeline's conversations for text-only prompts: [system, user] each, content lists.
    "[IMG]" is taken out of each prompt as diffusers does (Pixtral's processor counts those
    tokens against the images it is given: none here)."""
    return [[{"role": "system", "content": [{"type": "text", "text": system_message}]},
             {"role": "user", "content": [{"type": "text", "text": prompt.replace(IMG, "")}]}]
            for prompt in prompts]


def tokenize(processor: Any, prompts: str | Sequence[str],
             max_sequence_length: int = FLUX2_DEV_MAX_SEQUENCE_LENGTH,
             system_message: str = SYSTEM_MESSAGE) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), each (B, max_sequence_length) int32, for FLUX.2 [dev]'s encoder.

    processor: the hub's tokenizer/ (PixtralProcessor) or a tokenizer with Mistral's chat template.
    A chat longer than max_sequence_length tokens is cut at its end, as diffusers cuts it (with it
    the closing [/INST]), and a PromptTruncatedWarning says which prompt.
    """
    from fluxjax.pipeline.text import PromptTruncatedWarning, _as_prompt_list, _short

    check_chat_tokenizer(processor, max_sequence_length, "FLUX.2 [dev]'s Mistral processor")
    prompts = _as_prompt_list(prompts)
    conversations = chats(prompts, system_message)
    template = dict(add_generation_prompt=False, tokenize=True, return_dict=True)
    out = processor.apply_chat_template(conversations, **template, return_tensors="np", padding="max_length",
                                        truncation=True, max_length=int(max_sequence_length))
    # The same call uncut gives each chat's full length (a processor's template decides itself
    # whether the tokenizer adds a BOS, so the count is taken through it too).
    full = processor.apply_chat_template(conversations, **template, return_tensors=None, padding=False,
                                         truncation=False)["input_ids"]
    for i, (prompt, ids) in enumerate(zip(prompts, full)):
        if len(ids) > max_sequence_length:
            warnings.warn(f"Mistral prompt {i} ({_short(prompt)!r}) is {len(ids)} tokens long with its system "
                          f"message and chat template; its last {len(ids) - max_sequence_length} token(s) were cut "
                          f"to fit max_sequence_length = {max_sequence_length}", PromptTruncatedWarning, stacklevel=2)
    return np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32)


def make_tokenizer(folder: str | os.PathLike, corpus: Sequence[str] | None = None, num_merges: int = 200):
    """Write a tiny Mistral-style tokenizer to `folder` (transformers' save_pretrained layout) and
    return it: a byte-level BPE learnt on `corpus` (default tiny_tokenizers.CORPUS and
    SYSTEM_MESSAGE) with SPECIAL_TOKENS first (<s> the BOS, <pad> the pad), and CHAT_TEMPLATE."""
    from tokenizers import decoders
    from transformers import PreTrainedTokenizerFast

    from fluxjax.pipeline.tiny_tokenizers import CORPUS

    corpus = [*CORPUS, SYSTEM_MESSAGE] if corpus is None else corpus
    bpe = learn_bpe(corpus, num_merges, SPECIAL_TOKENS)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token=UNK, bos_token=BOS, eos_token=EOS,
                                        pad_token=PAD, model_max_length=131072)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(os.fspath(folder))
    return tokenizer
