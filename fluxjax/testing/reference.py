"""PyTorch reference models with random weights, for the tests and the benchmarks (needs the
`test` extra: torch, diffusers).

`randomize_(module)` gives a module weights of the scale trained ones have.
`make_hub_pipeline(root, kind)` builds diffusers' FluxPipeline from small random components
(transformer, VAE, CLIP, T5, locally trained tokenizers, the hub's scheduler config for dev or
schnell), saves it with `save_pretrained(root)` and returns it, so tests compare fluxjax with the
reference on exactly the files fluxjax loads.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from fluxjax.pipeline.tiny_tokenizers import make_tokenizers

TEXT_WIDTH = 32  # T5 d_model = transformer joint_attention_dim; CLIP width = pooled_projection_dim
VOCAB = 1000  # above both tokenizers' vocabularies

# The hub's model_index.json of a FLUX pipeline: which class each subfolder holds.
MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": "0.30.0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# The hub's scheduler_config.json of each model (docs/model-reference.md, "diffusers' FluxPipeline").
SCHEDULERS = {
    "dev": dict(use_dynamic_shifting=True, shift=3.0, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(use_dynamic_shifting=False, shift=1.0, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096),
}
TRANSFORMERS = {
    "dev": dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=3,
                axes_dims_rope=(4, 6, 6), guidance_embeds=True),
    "schnell": dict(num_layers=1, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
                    axes_dims_rope=(4, 6, 6), guidance_embeds=False),
}


def randomize_(module, seed: int = 0) -> None:
    """Give a PyTorch module random weights of the scale trained weights have.

    Matrices and kernels: N(0, 1/fan_in) (variance-preserving, as FLUX's trained weights are);
    norm scales: 1 + N(0, 0.3^2); every other vector (biases, norm shifts): N(0, 0.3^2).
    Zero or identity init would hide layout bugs (a swapped half of zeros is still zeros).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                value = noise / fan_in**0.5
            elif name.endswith(("weight", "scale")):  # a vector weight is a norm's scale
                value = 1 + 0.3 * noise
            else:
                value = 0.3 * noise
            p.copy_(value.to(p.dtype))


def make_hub_pipeline(root: str | os.PathLike, kind: str, seed: int = 0, pipeline_class=FluxPipeline,
                      **transformer) -> FluxPipeline:
    """Save a small random FLUX pipeline of `kind` ("dev" or "schnell") under root; return it (fp32, eval).

    pipeline_class: the diffusers pipeline built and saved (its name goes into model_index.json),
        e.g. FluxKontextPipeline, or FluxFillPipeline with in_channels=384, out_channels=64.
    transformer: FluxTransformer2DModel arguments replacing the kind's small defaults (e.g. a
    wider model for a benchmark, or a variant's in_channels).
    """
    root = os.fspath(root)
    make_tokenizers(root)
    transformer = FluxTransformer2DModel(
        patch_size=1, joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH,
        **{"in_channels": 64, **TRANSFORMERS[kind], **transformer},
    )
    randomize_(transformer, seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    # Default init: keeps the decoded pixels mostly inside [-1, 1], so the comparison is not
    # hidden by the final clamp.
    torch.manual_seed(seed)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, eos_token_id=2, bos_token_id=0, pad_token_id=1,
    ))
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=VOCAB, d_model=TEXT_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
    ))
    randomize_(clip, seed + 1)
    randomize_(t5, seed + 2)
    pipe = pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[kind]),
        vae=vae.eval(),
        text_encoder=clip.eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer")),
        text_encoder_2=t5.eval(),
        tokenizer_2=transformers.T5TokenizerFast.from_pretrained(os.path.join(root, "tokenizer_2")),
        transformer=transformer.eval(),
    )
    pipe.save_pretrained(root)
    return pipe
