"""Datasets and the `data` config section.

Every dataset is a `torch.utils.data.Dataset` of dicts, all items of one dataset of the same shape:
`image` float32 (C, D, H, W) or (C, H, W) in [-1, 1]; optional `mask` float32 (K, same spatial) in {0, 1};
optional `class_label` int64 scalar; optional `path` str.
"""
