"""`python -m pipefold.runtime.native`: build the C++ graph walk now (as `scripts/setup` does) and
say where it is, or that the Python walk will run. Exits 0 either way: the walk is optional."""

from __future__ import annotations

import logging

from pipefold.runtime.native import build, logger

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = build()
    if built is not None:
        logger.info("pipefold: C++ graph walk %s", built)
    else:
        logger.info("pipefold: no C++ graph walk; the Python walk runs")
