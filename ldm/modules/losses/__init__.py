"""Stage-1 autoencoder losses: reconstruction + LPIPS + KL or codebook terms, and a patch-GAN discriminator."""
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator
from ldm.modules.losses.discriminator import NLayerDiscriminator
from ldm.modules.losses.perceptual import MissingWeightsError, SlicedLPIPS, load_lpips
from ldm.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

__all__ = ["LPIPSWithDiscriminator", "MissingWeightsError", "NLayerDiscriminator", "SlicedLPIPS",
           "VQLPIPSWithDiscriminator", "load_lpips"]
