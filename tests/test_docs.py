"""The documentation site builds with ``mkdocs build --strict``, and its nav is complete.

Strict mode turns every warning into a failure: a nav entry without a file, a page outside the nav,
a link to a page or anchor that does not exist, and an API reference (``::: curvlib.xxx``) that
mkdocstrings cannot resolve. The site is built into a temporary directory.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG = ROOT / "mkdocs.yml"
# Every public module has an API reference page (docs/api/<page>.md containing `::: module`).
API_MODULES = {
    "curvlib": "curvlib",
    "curvlib.optim": "optim",
    "curvlib.diagnostics": "diagnostics",
    "curvlib.testing": "testing",
    "curvlib.kron": "kron",
    "curvlib.partitioned": "partitioned",
}
BUILD_TIMEOUT_S = 120


def nav_pages(node: Any) -> Iterator[str]:
    """The page paths of a mkdocs nav (nested lists of ``{title: path or list}`` or paths)."""
    if isinstance(node, str):
        if "://" not in node:
            yield node
    elif isinstance(node, list):
        for item in node:
            yield from nav_pages(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from nav_pages(value)


def load_config() -> dict[str, Any]:
    # mkdocs.yml may carry !ENV / !!python tags in general; ours does not, so safe_load suffices.
    return yaml.safe_load(CONFIG.read_text(encoding="utf-8"))


def test_every_nav_page_exists() -> None:
    config = load_config()
    pages = list(nav_pages(config["nav"]))
    assert pages, "mkdocs.yml has an empty nav"
    missing = [page for page in pages if not (DOCS / page).is_file()]
    assert not missing, f"nav pages without a file in docs/: {missing}"
    assert len(pages) == len(set(pages)), "a page appears twice in the nav"


def test_every_doc_page_is_in_nav() -> None:
    pages = set(nav_pages(load_config()["nav"]))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not on_disk - pages, f"pages in docs/ missing from the nav: {sorted(on_disk - pages)}"


@pytest.mark.parametrize("module", sorted(API_MODULES))
def test_public_module_has_an_api_page(module: str) -> None:
    importlib.import_module(module)
    page = DOCS / "api" / f"{API_MODULES[module]}.md"
    assert page.is_file(), f"no API page {page.relative_to(ROOT)} for {module}"
    directives = re.findall(r"^:::\s*(\S+)", page.read_text(encoding="utf-8"), flags=re.M)
    assert module in directives, f"{page.relative_to(ROOT)} has no `::: {module}`"
    assert f"api/{API_MODULES[module]}.md" in set(nav_pages(load_config()["nav"]))


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    for page in nav_pages(load_config()["nav"]):
        html = site / (page[: -len(".md")] + "/index.html")
        if page == "index.md":
            html = site / "index.html"
        assert html.is_file(), f"{page} was not rendered to {html.relative_to(site)}"
    # mkdocstrings rendered the API, not just the page headings.
    api = (site / "api" / "curvlib" / "index.html").read_text(encoding="utf-8")
    assert "CurvatureEstimate" in api and "to_dense" in api
