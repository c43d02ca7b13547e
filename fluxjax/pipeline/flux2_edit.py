"""FlowEdit of real images (fluxjax/sampling/flowedit.py) with a FLUX.2 pipeline: Flux2Pipeline.edit.

flowedit's loop takes FLUX.2's tokens as they are (128 features, 4 id columns, no pooled vector);
around it the FLUX.2 stages: the image prepared as inpainting's (flux2_inpaint.image_pixels), the
prompts through Qwen3 or Mistral, the image's tokens through the VAE encoder (flux2.encode_tokens),
the edited tokens through the decoder. The velocity is one transformer call, so a distilled klein
and FLUX.2 [dev] (its embedded guidance, source and target) run it; a base klein, whose velocity is
true CFG's two calls, is refused. Settings as flowedit.DEFAULTS "klein" and "flux2-dev" say.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fluxjax.errors import UsageError
from fluxjax.parallel.strategies import placed
from fluxjax.pipeline import checks
from fluxjax.pipeline.flux2_tokens import decode_tokens, encode_tokens, position_ids, text_ids
from fluxjax.pipeline.flux2_inpaint import image_pixels
from fluxjax.pipeline.outputs import as_output, check_output, gather
from fluxjax.sampling import flowedit
from fluxjax.sampling import sampler as sampling


def edit(pipe, image, source_prompt: str | Sequence[str], target_prompt: str | Sequence[str],
         num_steps: int | None = None, n_max: int | None = None, n_min: int | None = None, n_avg: int | None = None,
         source_guidance: float | None = None, target_guidance: float | None = None,
         seed: int | Sequence[int] = 0, max_sequence_length: int | None = None, output: str = "pil"):
    """Edit real images with FlowEdit: the source prompt describes the image, the target prompt what
    it should become; no inversion. pipe: a flux2.Flux2Pipeline.

    image: a path, PIL image or uint8 array (H, W, 3), or a list of B of them (of one size once
        prepared: scaled to at most 1024**2 pixels, resized to multiples of 16, as inpainting's).
    source_prompt, target_prompt: a string (used for every image) or a list of B strings.
    num_steps (T), n_max, n_min, n_avg, source_guidance, target_guidance: as FluxPipeline.edit,
        defaults flowedit.DEFAULTS["klein"] (4, 3, 0, 1, no guidance) or ["flux2-dev"] (28, 24, 0,
        1, 1.5, 5.5); guidance is refused by klein.
    seed: an int s (image i uses s + i) or B ints. max_sequence_length: the pipeline's default.
    output: "pil" (list of PIL images) or "np" (float32 (B, H, W, 3) in [0, 1]).
    """
    if output not in ("np", "pil"):
        raise UsageError(f"output must be 'np' or 'pil', got {output!r}")
    if not pipe.family.guidance_embed and not pipe.is_distilled:
        raise UsageError(f"{pipe.name} is a base klein (true CFG, two transformer calls a step): FlowEdit runs on a "
                         "distilled klein or FLUX.2 [dev]")
    given = list(image) if isinstance(image, (list, tuple)) else [image]
    if not given:
        raise UsageError("image: an empty list")
    pixels = [image_pixels(im) for im in given]
    if len({p.shape for p in pixels}) > 1:
        raise UsageError(f"image: the images of one edit need one size, got {sorted({p.shape[:2] for p in pixels})}")
    batch, (height, width) = len(pixels), pixels[0].shape[:2]
    sources, targets = (checks.prompt_list(name, p, batch) for name, p in
                        (("source_prompt", source_prompt), ("target_prompt", target_prompt)))
    guidance_embed = pipe.family.guidance_embed
    settings = flowedit.EditSettings(num_steps, n_max, n_min, n_avg, source_guidance, target_guidance).resolve(
        "flux2-dev" if guidance_embed else "klein", guidance_embed)
    length = pipe.defaults.max_sequence_length if max_sequence_length is None else max_sequence_length
    rows, cols = height // sampling.PIXELS_PER_TOKEN, width // sampling.PIXELS_PER_TOKEN
    sigmas = pipe.schedule.sigmas(settings.steps, rows * cols)

    inputs = dict(pixels=np.stack(pixels).astype(np.float32) / 127.5 - 1.0, img_ids=position_ids(batch, rows, cols),
                  txt_ids=text_ids(batch, length), keys=flowedit.seed_keys(checks.seeds(seed, batch)))
    for key, prompts in (("src", sources), ("tar", targets)):
        inputs[f"{key}_ids"], inputs[f"{key}_mask"] = pipe.family.tokenize(pipe.tokenizer, prompts, length)
    for key, value in (("src", settings.source_guidance), ("tar", settings.target_guidance)):
        if value is not None:
            inputs[f"guidance_{key}"] = np.full((batch,), value, np.float32)
    inputs, context = placed(pipe.strategy, pipe.mesh, inputs)
    with context:
        layers = pipe.family.layers
        txt_src = pipe._embed(inputs["src_ids"], inputs["src_mask"], layers)
        txt_tar = pipe._embed(inputs["tar_ids"], inputs["tar_mask"], layers)
        x_src = encode_tokens(pipe.vae.model, pipe.vae.params, inputs["pixels"])
        edited = flowedit.edit(pipe.transformer.model, pipe.transformer.params, x_src, inputs["img_ids"], txt_src, None,
                               txt_tar, None, inputs["txt_ids"], sigmas, inputs["keys"], inputs.get("guidance_src"),
                               inputs.get("guidance_tar"), np.int32(settings.n_max), np.int32(settings.n_min),
                               settings.n_avg)
        check_output(gather(edited)[:batch], "the edited latents of images")
        images = gather(decode_tokens(pipe.vae.model, pipe.vae.params, edited, rows, cols))[:batch]
    check_output(images)
    return as_output(images, output)
