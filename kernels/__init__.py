"""Tile kernels: torch references (CPU path) and generated Triton kernels (CUDA path)."""
