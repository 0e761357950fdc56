"""Triton kernels of posattn, installed as ``posattn.triton_kernels``.

Launchers take validated tensors and preallocated outputs; no autograd, checks or policy here.
Importing this package requires triton.
"""
