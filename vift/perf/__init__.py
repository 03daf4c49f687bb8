"""Speed benchmarks (``vift bench``): ratios measured in one run against a baseline.

Tools, not pipeline code: no DVC stage imports this package, so editing a benchmark reruns nothing.
"""
