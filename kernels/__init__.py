"""Triton kernels with autograd wrappers and pure-PyTorch references (the references are the spec).

On machines without CUDA the kernels still run through Triton's interpreter when `TRITON_INTERPRET=1` is set before
`triton` is imported (the test suite does this); models select kernels with `kernels: auto|triton|torch`.
"""
