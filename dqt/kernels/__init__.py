"""Fused kernels (Triton on CUDA, a fused CPU path) with their pure-torch references.
Nothing here queries a device or imports triton at import time."""
