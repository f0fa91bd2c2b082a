"""`python -m pipefold.runtime.native`: build the C++ graph walk now (as `scripts/setup` does) and
say where it is, or that the Python walk will run. Exits 0 either way: the walk is optional."""

from __future__ import annotations

import logging

from pipefold.runtime.native import build

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = build()
    print(f"pipefold: C++ graph walk {built}" if built is not None else "pipefold: no C++ graph walk; the Python walk runs")
