"""The CPU fast path: which OpenBLAS MLX uses (loaded before mlx.core) and the elementwise math that
runs faster in numpy's vectorized loops."""
