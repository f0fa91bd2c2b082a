"""pipefold's benchmarks: the side-by-side harness (`benchmarks.harness`, run by `run.py`) and
single-question scripts (`transport.py`, `hot_path.py`, ...), each run from a checkout.

A package so that the scripts and tests/bench import the harness as `benchmarks.harness`
from the repository root; nothing under `pipefold/` imports it.
"""
