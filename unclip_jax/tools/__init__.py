"""Command-line tools: benchmarks, ahead-of-time plans, FLOP counting, host probing and setup."""
