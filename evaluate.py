"""Score generated images with ldm.metrics: `python evaluate.py --samples DIR --real DIR --metrics fid,kid` or a
diffusion run's test-stage samples with `python evaluate.py -r logs/<run>` (see ldm/evaluate_cli.py and --help)."""
import sys

from ldm.evaluate_cli import main

if __name__ == "__main__":
    sys.exit(main())
