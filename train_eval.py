"""Train (-t) and/or test an evaluator network (segmenter or classifier) on real data, to score generated samples."""
import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
