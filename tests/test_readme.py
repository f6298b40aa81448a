"""Every ```python block of README.md runs: in order, in one namespace, from the repo root. A block opts out only
with the line ``<!-- readme-test: skip (why) -->`` right above its fence (a reason is required)."""
from __future__ import annotations

import re

import pytest

from .conftest import ROOT

FENCE = re.compile(r"^(?:<!-- readme-test: skip \((?P<reason>[^)\n]+)\) -->\n)?```python\n(?P<code>.*?)^```[ \t]*$",
                   re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line of the fence, code, skip reason or None) for every ```python block."""
    return [(text.count("\n", 0, m.start("code")), m["code"], m["reason"]) for m in FENCE.finditer(text)]


def test_block_parser():
    text = ("intro ```python inline``` text\n```python\na = 1\n```\n<!-- readme-test: skip (needs a GPU) -->\n"
            "```python\nb = 2\n```\n<!-- readme-test: skip -->\n```python\nc = 3\n```\n```bash\nls\n```\n")
    assert python_blocks(text) == [(2, "a = 1\n", None), (6, "b = 2\n", "needs a GPU"), (10, "c = 3\n", None)]


def test_readme_python_blocks_run(monkeypatch):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert any(reason is None for _, _, reason in blocks), "README.md has no executable python block"
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__readme__"}
    for line, code, reason in blocks:
        if reason is None:
            try:
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
            except Exception as e:
                pytest.fail(f"README.md python block at line {line} raised {type(e).__name__}: {e}")


RESULTS_TABLE = re.compile(r"<!-- results-table:start -->\n(?P<table>.*?)<!-- results-table:end -->", re.S)


@pytest.mark.parametrize("doc", ["README.md", "docs/results.md"])
def test_results_table_is_the_report_table_of_the_shipped_results_file(doc):
    """The headline table is generated, not typed: the text between the markers equals ``markdown_table`` of
    docs/results/main_job.json (``python -m mmqdiff.evaluation.report docs/results/main_job.json`` prints it)."""
    import json

    from mmqdiff.evaluation.report import markdown_table

    tables = RESULTS_TABLE.findall((ROOT / doc).read_text())
    assert len(tables) == 1, f"{doc}: expected one results table between the markers, found {len(tables)}"
    runs = json.loads((ROOT / "docs/results/main_job.json").read_text())["runs"]
    assert tables[0] == markdown_table(runs)


def test_report_module_prints_the_table(capsys):
    """``python -m mmqdiff.evaluation.report docs/results/main_job.json``, the command the docs give for the table."""
    import json

    from mmqdiff.evaluation.report import main, markdown_table

    path = ROOT / "docs/results/main_job.json"
    main([str(path)])
    assert capsys.readouterr().out == markdown_table(json.loads(path.read_text())["runs"])
