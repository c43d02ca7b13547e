"""Prompt tokenization: fluxjax's ids are the ids diffusers' FluxPipeline feeds its encoders.

The tokenizers are built locally by fluxjax/pipeline/tiny_tokenizers.py. The reference is a real
diffusers FluxPipeline loaded from the same folders; its text encoders are replaced by stubs
that record the ids `encode_prompt` passes them, so the reference is the pipeline's own
tokenizer calls, not a copy of them.
"""

from __future__ import annotations

import json
import types
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fluxjax.testing.reference import MODEL_INDEX
from fluxjax.pipeline.text import PromptTokenizer, PromptTruncatedWarning, encode_prompts, encode_prompts_jit
from fluxjax.pipeline.tiny_tokenizers import make_tokenizers

import diffusers
import transformers

LONG = "a very long prompt about " + "a red fox and a small wooden cabin in the snowy forest, " * 12



class _RecordingEncoder(torch.nn.Module):
    """Stands in for CLIPTextModel / T5EncoderModel inside the pipeline; records the ids."""

    def __init__(self, pooled: bool):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.pooled = pooled
        self.seen: list[np.ndarray] = []

    @property
    def dtype(self):
        return torch.float32

    def forward(self, input_ids, output_hidden_states=False):
        self.seen.append(input_ids.numpy().copy())
        if self.pooled:
            return types.SimpleNamespace(pooler_output=torch.zeros(input_ids.shape[0], 4))
        return (torch.zeros(input_ids.shape[0], input_ids.shape[1], 4),)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux_tokenizers")
    make_tokenizers(path)
    return path


@pytest.fixture(scope="module")
def pipe(root):
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    p = diffusers.FluxPipeline.from_pretrained(
        root, transformer=None, vae=None, text_encoder=None, text_encoder_2=None, scheduler=None
    )
    p.text_encoder = _RecordingEncoder(pooled=True)
    p.text_encoder_2 = _RecordingEncoder(pooled=False)
    return p


@pytest.fixture(scope="module")
def tok(root):
    return PromptTokenizer.from_folder(root)


def _pipeline_ids(pipe, prompts, max_sequence_length):
    pipe.text_encoder.seen.clear()
    pipe.text_encoder_2.seen.clear()
    pipe.encode_prompt(prompts, prompt_2=None, device=torch.device("cpu"), max_sequence_length=max_sequence_length)
    (clip_ids,), (t5_ids,) = pipe.text_encoder.seen, pipe.text_encoder_2.seen
    return t5_ids, clip_ids


def _exactly(tokenizer, n_tokens: int) -> str:
    """A prompt that tokenizes to exactly n_tokens ids (special tokens included)."""
    for words in range(1, 400):
        prompt = " ".join(["cabin"] * words)
        if len(tokenizer(prompt).input_ids) == n_tokens:
            return prompt
    raise AssertionError(f"no prompt of {n_tokens} tokens")


def test_fixture_tokenizers_look_like_the_real_ones(root, tok):
    clip, t5 = tok.clip, tok.t5
    assert (root / "tokenizer" / "vocab.json").is_file() and (root / "tokenizer" / "merges.txt").is_file()
    assert (root / "tokenizer_2" / "spiece.model").is_file()
    assert tok.clip_length == 77
    vocab = clip.get_vocab()
    assert vocab["<|endoftext|>"] == max(vocab.values()) == clip.eos_token_id == clip.pad_token_id
    assert vocab["<|startoftext|>"] == clip.bos_token_id == len(vocab) - 2
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    ids = t5("a photo of a cat").input_ids
    assert ids[-1] == 1 and 2 not in ids
    assert len(clip("a photo of a cat").input_ids) < 8  # merges are really used


@pytest.mark.parametrize("max_sequence_length", [32, 256, 512])
def test_ids_match_diffusers_flux_pipeline(pipe, tok, max_sequence_length):
    prompts = ["a photo of a cat", "", "A Portrait Of The Queen, ünïcode café!", LONG, "  spaces\tand\nnewlines  "]
    want_t5, want_clip = _pipeline_ids(pipe, prompts, max_sequence_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        t5_ids, clip_ids = tok(prompts, max_sequence_length=max_sequence_length)
    assert t5_ids.dtype == np.int32 and clip_ids.dtype == np.int32
    assert t5_ids.shape == (len(prompts), max_sequence_length) and clip_ids.shape == (len(prompts), 77)
    np.testing.assert_array_equal(t5_ids, want_t5)
    np.testing.assert_array_equal(clip_ids, want_clip)


def test_single_string_prompt(pipe, tok):
    want_t5, want_clip = _pipeline_ids(pipe, "a lighthouse at sunset", 64)
    t5_ids, clip_ids = tok("a lighthouse at sunset", 64)
    np.testing.assert_array_equal(t5_ids, want_t5)
    np.testing.assert_array_equal(clip_ids, want_clip)


def test_truncation_warns_with_prompt_and_cut_count(tok):
    clip_full = len(tok.clip(LONG).input_ids)
    t5_full = len(tok.t5(LONG).input_ids)
    assert clip_full > 77 and t5_full > 64
    prompts = ["a photo of a cat", LONG]
    with pytest.warns(PromptTruncatedWarning) as record:
        t5_ids, clip_ids = tok(prompts, max_sequence_length=64)
    messages = [str(w.message) for w in record if issubclass(w.category, PromptTruncatedWarning)]
    assert len(messages) == 2, messages
    t5_msg = next(m for m in messages if m.startswith("T5"))
    clip_msg = next(m for m in messages if m.startswith("CLIP"))
    assert "prompt 1" in t5_msg and f"last {t5_full - 64} token" in t5_msg and "a very long prompt" in t5_msg
    assert "prompt 1" in clip_msg and f"last {clip_full - 77} token" in clip_msg
    # The cut ids are the last ones: what is kept is the start of the prompt, then the end token.
    np.testing.assert_array_equal(t5_ids[1, :63], tok.t5(LONG).input_ids[:63])
    assert t5_ids[1, 63] == 1 and clip_ids[1, 76] == tok.clip.eos_token_id


def test_no_warning_at_exact_fit_and_warning_one_over(tok):
    fits, over = _exactly(tok.clip, 77), _exactly(tok.clip, 78)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        tok.tokenize_clip([fits, "short"])
    with pytest.warns(PromptTruncatedWarning, match=r"CLIP prompt 0 .*last 1 token"):
        tok.tokenize_clip([over])
    t5_fits = _exactly(tok.t5, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        ids = tok.tokenize_t5(t5_fits, 40)
    assert ids[0, -1] == 1 and 0 not in ids


def test_bad_arguments(tok, tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        tok([], 64)
    with pytest.raises(TypeError, match="prompt 1"):
        tok(["ok", 3], 64)
    with pytest.raises(ValueError, match="max_sequence_length"):
        tok("ok", 0)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        PromptTokenizer.from_folder(tmp_path)


class _FakeT5(nn.Module):
    """A stand-in sequence encoder (B, L) ids -> (B, L, 8)."""

    @nn.compact
    def __call__(self, ids):
        return nn.Embed(300, 8)(ids) * 2.0


def test_encode_prompts_pools_at_eos_like_transformers(root, tok, tmp_path):
    """End to end with real tokenizer output: padded CLIP ids (pad = eos = largest id, the
    legacy eos_token_id 2 config of FLUX) pooled exactly as transformers' CLIPTextModel does."""
    from fluxjax.loading.registry import load_clip

    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(tok.clip), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, eos_token_id=2, bos_token_id=0, pad_token_id=1,
    )
    ref = transformers.CLIPTextModel(cfg).eval()
    ref.save_pretrained(tmp_path / "text_encoder")
    clip_model, clip_params = load_clip(tmp_path / "text_encoder")

    prompts = ["a photo of a cat", "a bowl of ramen with eggs", LONG]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        t5_ids, clip_ids = tok(prompts, max_sequence_length=24)
    t5_model = _FakeT5()
    t5_params = t5_model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]

    txt, vec = encode_prompts(t5_model, t5_params, clip_model, clip_params, t5_ids, clip_ids)
    assert txt.shape == (3, 24, 8) and vec.shape == (3, 32)
    with torch.no_grad():
        want = ref(torch.from_numpy(clip_ids.astype(np.int64))).pooler_output.numpy()
    assert np.abs(np.asarray(vec) - want).max() <= 1e-5 * np.abs(want).max()
    np.testing.assert_allclose(np.asarray(txt), np.asarray(t5_model.apply({"params": t5_params}, t5_ids)))

    txt_j, vec_j = encode_prompts_jit(t5_model, t5_params, clip_model, clip_params, t5_ids, clip_ids, jnp.bfloat16)
    assert txt_j.dtype == vec_j.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(vec_j, np.float32), np.asarray(vec), rtol=1e-2, atol=1e-2)
