"""The code shown to newcomers runs: the tour of docs/index.md and the README's example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))


@pytest.mark.parametrize("page", ["docs/index.md", "README.md"])
def test_page_code_runs(page: str) -> None:
    code = python_blocks(ROOT / page)
    assert code, f"{page} shows no Python code"
    torch.manual_seed(0)
    exec(compile(code, page, "exec"), {"__name__": "tour"})
