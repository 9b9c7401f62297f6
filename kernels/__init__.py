"""Triton kernels of dcn_fast, importable as ``dcn_fast.kernels``."""
