"""Tile kernels: torch references (CPU path), generated Triton kernels (CUDA path), and the
registry (kernels.registry) that holds one entry per kernel and the rule choosing a tile's kernel."""
