"""Stage 2: train (-t) and/or test a latent diffusion model in a frozen autoencoder's latent space; without -t only the test stage runs (it generates samples)."""
import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
