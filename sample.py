"""Draw samples from a trained diffusion run: `python sample.py -r logs/<run> --n_samples 8 --sampler ddim --steps 50`
(see ldm/sample_cli.py and --help)."""
import sys

from ldm.sample_cli import main

if __name__ == "__main__":
    sys.exit(main())
