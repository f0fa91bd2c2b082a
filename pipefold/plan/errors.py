"""`NoFeasiblePlan`: no configuration fits the memory limit; says how much would, and how."""

from __future__ import annotations

from pipefold.errors import ConfigError
from pipefold.plan.result import Candidate
from pipefold.plan.units import format_bytes

__all__ = ["NoFeasiblePlan"]


class NoFeasiblePlan(ConfigError):
    """Raised by `plan` when every configuration searched needs more memory than the limit.

    `least` is the configuration that needs the least memory (its `peak_memory` is the
    smallest limit that would give a plan) and `fastest` the fastest one ignoring memory.
    """

    def __init__(self, memory_limit: float, least: Candidate, fastest: Candidate) -> None:
        self.memory_limit = memory_limit
        self.least = least
        self.fastest = fastest
        knobs = []
        if least.recompute != fastest.recompute:
            knobs.append(f"recompute {fastest.recompute_text} -> {least.recompute_text}")
        if least.num_microbatches != fastest.num_microbatches:
            knobs.append(f"micro-batches {fastest.num_microbatches} -> {least.num_microbatches}")
        if least.degree_text != fastest.degree_text:
            knobs.append(f"{fastest.degree_text} -> {least.degree_text}")
        if (least.schedule, least.num_virtual) != (fastest.schedule, fastest.num_virtual):
            before = f"{fastest.schedule} v={fastest.num_virtual}"
            knobs.append(f"schedule {before} -> {least.schedule} v={least.num_virtual}")
        how = f" (from the fastest setting: {'; '.join(knobs)})" if knobs else ""

        def describe(candidate: Candidate) -> str:
            # The split is named whenever data parallelism is in play, so a reader can rerun it.
            plain = least.num_data_parallel == fastest.num_data_parallel == 1
            return candidate.describe() if plain else f"{candidate.degree_text}, {candidate.describe()}"

        if least.rank_limits:
            # A mix of device kinds: each rank has its own devices' memory; name the tightest.
            rank = least.tightest_rank(memory_limit)
            own = min(memory_limit, least.rank_limits[rank])
            super().__init__(
                f"no configuration fits each rank's memory on this mix of devices (the smaller of the limit "
                f"{format_bytes(memory_limit)} and its devices' own). The closest, {describe(least)}{how}, "
                f"needs {format_bytes(least.memory[rank].total)} on rank {rank}, whose devices give "
                f"{format_bytes(own)} (over by {format_bytes(least.over_limit(memory_limit))}); put devices "
                "with more memory there (reorder or resize the hardware file's [[device_groups]]), or use "
                "more devices."
            )
            return
        super().__init__(
            f"no configuration fits the memory limit of {format_bytes(memory_limit)} per rank. The least "
            f"memory any searched configuration needs is {format_bytes(least.peak_memory)} on rank "
            f"{least.peak_rank}, with {describe(least)}{how}; raise the limit to at least "
            f"{format_bytes(least.peak_memory)} ({least.peak_memory} bytes), or use more ranks. "
            f"The fastest configuration, {describe(fastest)}, needs {format_bytes(fastest.peak_memory)}."
        )
