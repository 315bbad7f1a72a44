"""Evaluator networks trained on real data, used to score generated samples: a `Segmenter` (Dice of its prediction on
a mask-conditioned sample against the conditioning mask) and a `Classifier` (accuracy on class-conditional samples).
Train one with `python train_eval.py -b configs/eval/<config>.yaml -t -n <name>`, load it with `load_evaluator`."""
from ldm.models.evaluators.classifier import Classifier
from ldm.models.evaluators.loading import load_evaluator
from ldm.models.evaluators.segmenter import Segmenter, as_onehot

__all__ = ["Classifier", "Segmenter", "as_onehot", "load_evaluator"]
