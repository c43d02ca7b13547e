"""Reading checkpoints: PyTorch safetensors (BFL single files, diffusers/hub folders) and the
Orbax folders `fluxjax convert` writes -> Flax parameter trees.

fluxjax.loading.registry holds the table of components and the one loader over it (`load`,
`load_transformer`, ...); each layout module (flux, t5, clip, vae) gives its key tables
(`read_table`), applied strictly by fluxjax.loading.table; reading goes through
fluxjax.loading.safetensors_io, one tensor at a time, without torch.
"""
