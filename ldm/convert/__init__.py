"""Pretrained weights in and out: CompVis / Stable Diffusion single files and diffusers folders <-> our modules."""
