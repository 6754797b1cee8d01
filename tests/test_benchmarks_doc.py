"""docs/benchmarks.md and the README's results tables are generated from ``bench/results/*.json``
by ``bench/make_benchmarks_doc.py``: the committed text is what the committed results give, and
every number in the README's tables comes from the result files its table names."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import make_benchmarks_doc as M  # noqa: E402

STALE = "out of date: run python bench/make_benchmarks_doc.py"
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]\d+)?(?![\w.])")
AGGREGATED = {"transfer", "decoding", "closedloop"}  # cells: means ± sd (sums) over seeds of the file's rows


def _readme_blocks() -> dict[str, str]:
    return {m.group("key"): m.group("body") for m in M.BLOCK.finditer((REPO / "README.md").read_text())}


def test_the_doc_is_what_the_committed_results_give():
    text = M.benchmarks_doc()
    assert text == M.benchmarks_doc()  # deterministic
    assert (REPO / "docs" / "benchmarks.md").read_text() == text, f"docs/benchmarks.md is {STALE}"


def test_the_doc_names_every_result_file():
    doc = M.benchmarks_doc()
    for path in sorted(M.RESULTS.glob("*.json")):
        assert f"(../bench/results/{path.name})" in doc, path.name


def test_the_readme_has_one_generated_table_per_benchmark_naming_its_files():
    blocks = _readme_blocks()
    assert sorted(blocks) == sorted(s.key for s in M.SECTIONS)
    for s in M.SECTIONS:
        assert blocks[s.key] == M.readme_block(s), f"README table {s.key!r} is {STALE}"
        for name in s.sources:
            assert (M.RESULTS / name).is_file() and f"`bench/results/{name}`" in blocks[s.key]


def test_each_readme_table_is_built_from_its_named_files_alone(tmp_path):
    """Only a section's own files in the folder (and a loader that refuses any other): same table."""
    blocks = _readme_blocks()
    for s in M.SECTIONS:
        folder = tmp_path / s.key
        folder.mkdir()
        for name in (*s.sources, *([s.plot] if s.plot else [])):
            shutil.copy(M.RESULTS / name, folder / name)
        assert M.readme_block(s, folder) == blocks[s.key], s.key


def _numbers(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []


def _spec(token: str) -> str:
    if "e" in token:
        return f".{len(token.split('e')[0].partition('.')[2])}e"
    return f".{len(token.partition('.')[2])}f"


def test_every_number_in_the_readme_tables_is_in_its_result_file():
    """A cell of a non-aggregated table is a value of the named file at the precision shown
    (the aggregated ones are checked above: rebuilt from their files alone)."""
    blocks = _readme_blocks()
    for s in M.SECTIONS:
        if s.key in AGGREGATED:
            continue
        values = [x for name in s.sources for x in _numbers(json.loads((M.RESULTS / name).read_text()))]
        shown: dict[str, set[str]] = {}
        rows = [ln for ln in blocks[s.key].splitlines() if ln.startswith("| ") and "---" not in ln][1:]
        assert rows, s.key
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split("|")]
            for cell in cells[1:]:
                if cell.startswith("`"):  # a command line
                    continue
                for token in NUMBER.findall(cell):
                    spec = _spec(token)
                    if spec not in shown:
                        shown[spec] = {format(x, spec) for x in values}
                    assert token.lstrip("+") in shown[spec], f"{s.key}: {token} ({row}) is not in {s.sources}"
