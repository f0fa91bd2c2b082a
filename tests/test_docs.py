"""The docs hold what the code cites: every `docs/decisions.md, "<title>"` in the code names a
`###` heading there, every relative link in README.md and docs/ points at a file of the
repository (no link leaves it, e.g. to ../shared), and no module keeps a `[Note: ...]` block."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = [*(ROOT / "pipefold").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")]


def _headings() -> set[str]:
    """The `###` headings of docs/decisions.md and the bold titles its bullets open with."""
    text = (ROOT / "docs" / "decisions.md").read_text(encoding="utf-8")
    titles = {line[4:].strip().lower() for line in text.splitlines() if line.startswith("### ")}
    titles |= {title.lower().rstrip(".") for title in re.findall(r"^- \*\*([^*]+)\*\*", text, re.M)}
    return titles


def test_every_cited_note_is_a_heading_of_decisions_md():
    headings = _headings()
    missing = set()
    for path in CODE:
        # A citation may wrap over comment lines: join them without their "#".
        text = " ".join(re.sub(r"\n\s*#\s*", " ", path.read_text(encoding="utf-8")).split())
        for title in re.findall(r'docs/decisions\.md, "([^"]+)"', text):
            if title.lower() not in headings:
                missing.add((path.relative_to(ROOT).as_posix(), title))
    assert not missing, f"cited notes without a heading in docs/decisions.md: {sorted(missing)}"


def test_no_note_blocks_left_in_the_code():
    found = [p.relative_to(ROOT).as_posix() for p in CODE if "[Note:" in p.read_text(encoding="utf-8")]
    assert not found, f"move these [Note: ...] blocks to docs/decisions.md: {found}"


def test_relative_links_stay_inside_the_repository():
    broken = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append((path.relative_to(ROOT).as_posix(), target))
    assert not broken, f"links that leave the repository or point nowhere: {broken}"


def test_hardware_files_shown_in_the_docs_load_as_their_preset():
    """Every TOML hardware file README.md and docs/plan.md show is valid, and one that names a
    preset agrees with it in each figure it gives (a shortened copy may leave dtypes out)."""
    import tomllib

    from pipefold.plan.hardware import PRESETS, hardware_from_mapping, load_hardware

    shown = 0
    for path in (ROOT / "README.md", ROOT / "docs" / "plan.md"):
        for block in re.findall(r"```toml\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
            data = tomllib.loads(block)
            if "devices_per_node" not in data:
                continue
            shown += 1
            hardware = hardware_from_mapping(data, origin=path.name)
            if hardware.name not in PRESETS:
                continue
            preset = load_hardware(hardware.name)
            assert {dtype: preset.peak_flops[dtype] for dtype in hardware.peak_flops} == dict(
                hardware.peak_flops
            )
            for field in ("matmul", "memory_bandwidth", "memory_bytes", "reserve_bytes", "devices_per_node",
                          "intra_node", "inter_node", "default_dtype"):
                assert getattr(hardware, field) == getattr(preset, field), (path.name, field)
    assert shown >= 2
