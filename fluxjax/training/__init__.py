"""Training: the trainer (config, loss, state, step, run folder) and the captioned-image data it reads."""
