"""Reading checkpoints: PyTorch safetensors (BFL single files, diffusers/hub folders) and the
Orbax folders `fluxjax convert` writes -> Flax parameter trees.

One key table per checkpoint layout (see fluxjax.loading.table); reading goes through
fluxjax.loading.safetensors_io, one tensor at a time, without torch.
"""
