"""Trainable models: the stage-1 autoencoders and the latent diffusion model."""
