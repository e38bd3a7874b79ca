"""Triton kernels, one kernel (or kernel pair) and its launcher per file; no autograd here."""
