"""Training: the block-diffusion objective and loop (`trainer`)."""
