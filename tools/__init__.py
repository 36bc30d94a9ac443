"""Development tools of the repository (benchmarks, checks); not installed with any package.

A regular package so that `python -m tools.rabbit_bench` works from the checkout's root with no
`sys.path` edits.
"""
