"""The documentation site builds with ``mkdocs build --strict`` (a broken link or anchor, a page left out of the nav or an
API reference that does not resolve fails it), and the README stays short and links to every page."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import docs as doc_helpers

ROOT = doc_helpers.ROOT
README_MAX_LINES = 150
LINK = re.compile(r"\]\(([^)\s]+)\)")  # the target of a Markdown link or image


def test_the_site_builds_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "store" / "index.html").read_text().count("open_features") > 1  # rendered, not echoed


def test_the_nav_lists_every_page_once():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def entries(nav) -> list[str]:
        out = []
        for item in nav:
            value = item if isinstance(item, str) else next(iter(item.values()))
            out += entries(value) if isinstance(value, list) else [value]
        return out

    listed = entries(config["nav"])
    on_disk = sorted(str(p.relative_to(doc_helpers.DOCS)) for p in doc_helpers.DOCS.rglob("*.md"))
    assert sorted(listed) == on_disk and len(set(listed)) == len(listed)


def test_the_readme_is_short_and_links_to_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    targets = LINK.findall(readme)
    linked = {t.split("#")[0] for t in targets}
    pages = {str(p.relative_to(ROOT)) for p in doc_helpers.DOCS.glob("*.md")}  # the task pages (api/ via its index)
    assert pages | {"docs/api/index.md"} <= linked, sorted(pages - linked)


def test_every_relative_link_resolves_on_github_too():
    """mkdocs checks the links inside docs/ with its own anchors; the README lives outside it, and GitHub renders every
    page with its own anchors, so each page's relative links are checked here with GitHub's."""
    problems = []
    for page in doc_helpers.pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not file.exists():
                problems.append(f"{where}: no such file")
            elif anchor and anchor not in heading_slugs(file):
                problems.append(f"{where}: {file.name} has no heading with the anchor #{anchor} on GitHub")
    assert problems == []


def heading_slugs(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped, spaces to hyphens)."""
    slugs = set()
    in_fence = False
    for line in path.read_text().splitlines():
        if doc_helpers.FENCE.match(line.strip()):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"^#{1,6}\s+(.*?)\s*$", line)):
            slugs.add(re.sub(r"[^\w\- ]", "", m[1].lower()).replace(" ", "-"))
    return slugs
