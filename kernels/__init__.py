"""Triton kernels of minitron (installed as ``minitron_kernels``)."""
