"""FlowEdit of real images (fluxjax/sampling/flowedit.py) as FluxPipeline's `edit`: the pipeline's
checks, text encoder, VAE and decode stage around flowedit's loop."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fluxjax.errors import UsageError
from fluxjax.pipeline import checks, conditioning
from fluxjax.pipeline.outputs import as_output, check_output, gather
from fluxjax.sampling import sampler as sampling


class EditMixin:
    """FluxPipeline's `edit`. Uses the pipeline's encode, decode, settings, _placed and _timed."""

    def edit(self, image, source_prompt: str | Sequence[str], target_prompt: str | Sequence[str],
             num_steps: int | None = None, n_max: int | None = None, n_min: int | None = None,
             n_avg: int | None = None, source_guidance: float | None = None, target_guidance: float | None = None,
             seed: int | Sequence[int] = 0, resize: str | None = None, max_sequence_length: int | None = None,
             output: str = "pil"):
        """Edit real images with FlowEdit (fluxjax/sampling/flowedit.py): the source prompt describes the
        image, the target prompt what it should become; no inversion.

        image: a path, PIL image or array (H, W, 3) (uint8, or floats in [0, 1]), or a list of B of
            them of one size; sides multiples of 16 unless `resize` is "crop" or "scale"
            (fluxjax/pipeline/conditioning.py).
        source_prompt, target_prompt: a string (used for every image) or a list of B strings.
        num_steps (T), n_max, n_min, n_avg, source_guidance, target_guidance: default to the
            model's (flowedit.DEFAULTS; dev: 28, 24, 0, 1, 1.5, 5.5); guidance is refused by
            models without a guidance embedding.
        seed: an int s (image i uses s + i) or B ints; image i's noise depends on its seed only.
        output: "pil" (list of PIL images), "np" (float32 (B, H, W, 3) in [0, 1]) or "latents"
            (the edited latents, float32 (B, 16, H/8, W/8), NCHW as `pipe(latents=)` takes them).
        """
        from fluxjax.sampling import flowedit

        if output not in ("np", "pil", "latents"):
            raise UsageError(f"output must be 'np', 'pil' or 'latents', got {output!r}")
        flowedit.check_variant(self.variant, self.name)
        pixels = conditioning.load_images(image, resize, "image")
        batch, (height, width) = len(pixels), pixels[0].shape[:2]
        sources, targets = (checks.prompt_list(name, p, batch) for name, p in
                            (("source_prompt", source_prompt), ("target_prompt", target_prompt)))
        checks.check_grammar(self.grammar, self.name, sources + targets, stacklevel=2)  # the line calling edit
        settings = flowedit.EditSettings(num_steps, n_max, n_min, n_avg, source_guidance, target_guidance).resolve(
            self.kind, self.transformer.model.config.guidance_embed)
        _, _, max_sequence_length = self.settings(max_sequence_length=max_sequence_length)
        sigmas = self.schedule.sigmas(settings.steps, (height // 16) * (width // 16))

        src_t5, src_clip = self.tokenizer(sources, max_sequence_length)
        tar_t5, tar_clip = self.tokenizer(targets, max_sequence_length)
        guidance = {f"guidance_{k}": None if g is None else np.full((batch,), g, np.float32)
                    for k, g in (("src", settings.source_guidance), ("tar", settings.target_guidance))}
        inputs = dict(pixels=conditioning.to_model_pixels(np.stack(pixels)), src_t5=src_t5, src_clip=src_clip,
                      tar_t5=tar_t5, tar_clip=tar_clip, img_ids=sampling.image_ids(batch, height, width),
                      txt_ids=sampling.text_ids(batch, src_t5.shape[1]),
                      keys=flowedit.seed_keys(checks.seeds(seed, batch)), **guidance)
        inputs, context = self._placed(inputs)
        with context:
            with self._timed("encode"):
                txt_src, vec_src = self.encode(inputs["src_t5"], inputs["src_clip"])
                txt_tar, vec_tar = self.encode(inputs["tar_t5"], inputs["tar_clip"])
                x_src = conditioning.encode_packed(self.vae.model, self.vae.params, inputs["pixels"])
                x_src.block_until_ready()
            with self._timed("edit"):
                edited = flowedit.edit(self.transformer.model, self.transformer.params, x_src, inputs["img_ids"],
                                       txt_src, vec_src, txt_tar, vec_tar, inputs["txt_ids"], sigmas, inputs["keys"],
                                       inputs["guidance_src"], inputs["guidance_tar"], np.int32(settings.n_max),
                                       np.int32(settings.n_min), settings.n_avg)
                edited.block_until_ready()
            if output == "latents":
                check_output(gather(edited)[:batch], "the edited latents of images")
                return np.asarray(sampling.unpack(gather(edited)[:batch], height, width))
            with self._timed("decode"):
                images = self.decode(edited, batch, height, width, "the edited latents of images")
        return as_output(images, output)
