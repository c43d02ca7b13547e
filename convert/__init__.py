"""PyTorch safetensors checkpoints -> Flax parameter trees (and Orbax checkpoints).

One key table per checkpoint layout (see convert.table); reading goes through
convert.safetensors_io, one tensor at a time, without torch.
"""
