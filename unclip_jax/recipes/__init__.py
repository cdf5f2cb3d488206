"""Whole-stack jobs: every unCLIP stage trained in order on one dataset, then sampled and reported
(runner.py), with what differs per recipe in shapes.py and webdata.py."""
