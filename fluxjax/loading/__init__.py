"""Reading checkpoints: PyTorch safetensors (BFL single files, diffusers/hub folders) and the
Orbax folders `fluxjax convert` writes -> Flax parameter trees.

fluxjax.loading.registry holds the table of components and the one loader over it (`load`,
`load_transformer`, ...); each layout module (flux, t5, clip, vae) gives its key tables
(`read_table`), applied strictly by fluxjax.loading.table; reading goes through
fluxjax.loading.safetensors_io, one tensor at a time, without torch (a transformer single file
may also be fp8, read by fluxjax.loading.fp8, or a GGUF, by fluxjax.loading.gguf and ggml).
"""
