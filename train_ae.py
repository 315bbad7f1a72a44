"""Stage 1: train (-t) and/or test an autoencoder (KL or VQ) on 2D or 3D images."""
import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
