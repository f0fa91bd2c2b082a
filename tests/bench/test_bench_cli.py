"""`python benchmarks/run.py` argument parsing (nothing is run)."""

import pytest

from benchmarks.harness import cli
from benchmarks.harness.pairs import PAIRS, SOLO
from pipefold.errors import ConfigError


def _parse(argv):
    return cli.build_parser().parse_args(argv)


def test_parser_is_run_py_s():
    parser = cli.build_parser()
    assert parser.prog == "benchmarks/run.py"
    args = _parse([])
    assert not args.quick and args.peers == "auto" and args.seed == 0


def test_pipefold_cli_has_no_bench_command():
    from pipefold.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--quick"])


def test_a_refused_option_is_a_message_not_a_traceback(capsys):
    assert cli.main(["--ranks", "1", "--results-dir", "/nonexistent/never-written"]) == 2
    assert "--ranks 1" in capsys.readouterr().err


def test_quick_matrix_and_options():
    args = _parse(["--quick", "--peers", "torch"])
    [matrix] = cli.matrices_from_args(args)
    assert matrix.workloads == ("mlp",) and matrix.ranks == (2,) and matrix.microbatches == (8,)
    assert len(matrix.schedules) == 3 and {"gpipe", "1f1b"} <= set(matrix.schedules)
    options = cli.options_from_args(args)
    assert options.libraries == ("pipefold", "torch")
    assert (options.warmup_steps, options.timed_steps) == (1, 5)


def test_full_matrix_has_every_pair_and_the_overhead_probe():
    args = _parse(["--peers", "none"])
    matrix, overhead = cli.matrices_from_args(args)
    assert set(matrix.schedules) == set(PAIRS) | set(SOLO)
    assert matrix.ranks == (2, 4) and matrix.microbatches == (4, 8, 16)
    assert set(matrix.workloads) == {"mlp", "transformer"}
    assert overhead.workloads == ("tiny",)
    assert cli.options_from_args(args).libraries == ("pipefold",)
    assert len(matrix.configs(2)) == 2 * 3 * (len(PAIRS) + len(SOLO))


def test_custom_matrix_skips_overhead():
    args = _parse(["--workloads", "transformer", "--ranks", "4", "--microbatches", "8", "16",
                   "--schedules", "zb-v", "--steps", "9", "--warmup", "0", "--quiet-threshold", "0.2"])
    [matrix] = cli.matrices_from_args(args)
    assert matrix.workloads == ("transformer",) and matrix.ranks == (4,)
    assert matrix.microbatches == (8, 16) and matrix.schedules == ("zb-v",)
    options = cli.options_from_args(args)
    assert (options.timed_steps, options.warmup_steps, options.gate.threshold) == (9, 0, 0.2)


def test_bad_values_are_refused():
    with pytest.raises(SystemExit):
        _parse(["--schedules", "pipedream"])  # no torch counterpart
    with pytest.raises(SystemExit):
        _parse(["--microbatches", "0"])
    with pytest.raises(ConfigError, match="--ranks 1"):
        cli.matrices_from_args(_parse(["--ranks", "1"]))
    with pytest.raises(ConfigError, match="threshold"):
        cli.options_from_args(_parse(["--quiet-threshold", "0"]))


def test_one_json_line_has_the_required_fields():
    record = {key: 1 for key in cli._QUIET_FIELDS}
    record["sides"] = {"big": "blob"}
    line = cli._line(record)
    assert "\n" not in line and "sides" not in line
    for key in ("schedule", "ranks", "microbatches", "pipefold_step_s", "peer_step_s", "ratio",
                "efficiency", "predicted_step_s"):
        assert f'"{key}"' in line


def test_cli_module_does_not_import_torch():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = "import sys, benchmarks.harness.cli, benchmarks.harness.report; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
