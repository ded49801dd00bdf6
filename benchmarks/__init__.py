"""genserve's serving benchmarks: `python -m benchmarks.serving --help`."""
