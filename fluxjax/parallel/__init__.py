"""Placing work on devices: the sharding strategies (meshes, logical axis rules) and multi-host runs."""
