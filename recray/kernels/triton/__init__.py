"""Triton kernels behind the public ops; imported only when a Triton backend is chosen."""
