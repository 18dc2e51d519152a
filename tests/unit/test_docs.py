"""The docs: a short README that links every page, links that resolve, and tables that are what the result files
say (`make docs` regenerates them; this fails when a result file changed and the docs were not regenerated)."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 12_000
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", readme))
    assert pages and pages <= linked, pages - linked


def test_relative_links_resolve():
    broken = []
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} → {target}")
    assert broken == []


def test_generated_tables_are_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "docs_tables.py"), "--check"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_comparison_of_runs_is_a_tie_unless_the_ranges_part():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts" / "docs_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    verdict = tables.range_verdict
    assert verdict({"min": 1, "max": 2}, {"min": 3, "max": 4}, "x") == "lower than x in every run"
    assert verdict({"min": 5, "max": 6}, {"min": 3, "max": 4}, "x") == "higher than x in every run"
    # medians apart but ranges touching or overlapping: tied
    for ours in ({"min": 1, "max": 3}, {"min": 4, "max": 9}, {"min": 0, "max": 9}):
        assert verdict(ours, {"min": 3, "max": 4}, "x").startswith("tied with x")
    assert verdict(None, {"min": 3, "max": 4}, "x") == "not measured"
