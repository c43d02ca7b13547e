"""FLUX.2 [klein] with cached references: diffusers' Flux2KleinKVPipeline (0.42.1,
pipelines/flux2/pipeline_flux2_klein_kv.py), run by Flux2Pipeline for a folder whose
model_index.json names that class (the family `flux2.KLEIN_KV`).

What diffusers computes (models/transformers/transformer_flux2.py, kv_cache_mode): at step 0 the
sequence is [text, references, image]; the references' modulation is computed at a fixed time
(`ref_fixed_timestep`, 0: `_blend_double_block_mods`, `_blend_single_block_mods`), their queries
attend only to the references' keys, while the text and image queries attend to every token
(`_flux2_kv_causal_attention`); each block's reference keys (after RoPE) and values are stored
(Flux2KVCache) and later steps run [text, image] with them injected between text and image.
A reference token's state therefore depends only on the reference tokens, their ids and the
fixed time, never on the step, the prompt or the image: the cached K/V are those every step of
the uncached masked pass would compute, and the whole loop is that masked pass.

fluxjax runs it as settings of the same model and loop (sampling.Conditioning.ref_time): inside
the jitted loop, before the first step, one transformer call on the reference tokens alone (no
text tokens, time KV_REFERENCE_TIME, `Flux(return_kv=True)`) gives every block's reference K/V;
each step then runs the text and image tokens only, attending to them as well
(`Flux(ref_kv=...)`). Per step this saves the blocks' linears and MLPs on the L_ref reference
tokens and the references' own attention rows; it holds the K/V of every block for the loop
(2 x (double + single blocks) x B x L_ref x hidden). Without references it is Flux2KleinPipeline.
Defaults as that pipeline's: 4 steps, no CFG (it has no negative pass), no inpainting.
"""

from __future__ import annotations

KV_REFERENCE_TIME = 0.0  # diffusers' ref_fixed_timestep, which Flux2KleinKVPipeline leaves at its default
