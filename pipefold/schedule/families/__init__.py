"""One module per schedule family; importing this package registers them all, in this order."""

# The import order is the registration order, which `names()` reports: simplest first.
from pipefold.schedule.families import naive  # noqa: F401, I001
from pipefold.schedule.families import gpipe  # noqa: F401
from pipefold.schedule.families import one_f_one_b  # noqa: F401
from pipefold.schedule.families import interleaved_1f1b  # noqa: F401
from pipefold.schedule.families import looped_bfs  # noqa: F401
from pipefold.schedule.families import zb_h1  # noqa: F401
from pipefold.schedule.families import zb_h2  # noqa: F401
from pipefold.schedule.families import zb_v  # noqa: F401
from pipefold.schedule.families import v_half  # noqa: F401
from pipefold.schedule.families import v_min  # noqa: F401
from pipefold.schedule.families import dualpipe_v  # noqa: F401
from pipefold.schedule.families import pipedream  # noqa: F401
from pipefold.schedule.families import pipedream_2bw  # noqa: F401
