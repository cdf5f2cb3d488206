"""Benchmarks that need more than the package: the PyTorch reference U-Net (torch, in the test extra)."""
