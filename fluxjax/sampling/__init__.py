"""Rectified-flow sampling: noise, packing, the schedule, the jitted denoising loop, and FlowEdit."""
