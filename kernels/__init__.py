"""Triton kernels (shipped as pyengine.kernels)."""
