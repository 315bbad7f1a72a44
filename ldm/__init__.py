"""Latent diffusion for 3D and 2D images: models, data, samplers, training engine."""
