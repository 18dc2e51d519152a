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
