"""LoRA adapters on the FLUX transformer: the file formats read, and the adapters fused or run live."""
