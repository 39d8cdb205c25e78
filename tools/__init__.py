"""Developer tools for the Triton kernels (run from a checkout: python -m tools.NAME)."""
