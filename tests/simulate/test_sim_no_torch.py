"""The simulator, the timeline and the views load without torch (and views without matplotlib)."""

import subprocess
import sys

CODE = """
import sys
import pipefold.simulate, pipefold.timeline, pipefold.viz
from pipefold.schedule import build
from pipefold.simulate import CostModel, simulate
from pipefold.viz import render_ascii, to_chrome_trace
timeline = simulate(build("gpipe", num_ranks=2, num_microbatches=2), CostModel.uniform(2))
render_ascii(timeline)
to_chrome_trace(timeline)
print(sorted(name for name in ("torch", "matplotlib") if name in sys.modules))
"""


def test_simulate_and_views_import_no_torch_or_matplotlib():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
