"""Hand-written kernels for the hot path (see cpu.py)."""
