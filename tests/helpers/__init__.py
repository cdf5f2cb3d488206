"""Helpers shared by the tests: configs, tree comparisons, the multi-process worker."""
