"""One module per schedule family; importing this package registers them all, in this order."""

from pipefold.schedule.families import gpipe  # noqa: F401
