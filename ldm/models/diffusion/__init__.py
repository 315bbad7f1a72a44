"""Diffusion models: schedules, the Gaussian process and its losses, conditioning, samplers, DDPM / LatentDiffusion."""
