"""Whole-stack jobs: every unCLIP stage trained in order on one dataset, then sampled and reported."""
