"""The ``curvlib`` command: help of every verb, the quick demo end to end, the report verb on a
user's model, command-line errors, and the README's library example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from curvlib.cli import main
from curvlib.demo.methods import METHODS
from curvlib.demo.models import MODELS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["report", "--help"]])
def test_help_of_every_verb(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: curvlib")
    expected = {"--help": ["demo", "report"], "demo": ["--methods", "--quick", "--device"],
                "report": ["--model", "--data", "--loss"]}[argv[0]]
    for word in expected:
        assert word in text


def test_python_dash_m_runs_the_command() -> None:
    result = subprocess.run([sys.executable, "-m", "curvlib", "--help"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: curvlib" in result.stdout


def test_quick_demo_writes_table_plots_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    main(["demo", "--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text(encoding="utf-8")
    table = printed[printed.index("model  "):]
    for model in MODELS:
        assert (out / f"{model}-loss.png").stat().st_size > 0
        assert (out / f"{model}-reduced-hessian.png").stat().st_size > 0
        for method in METHODS.values():
            row = rf"^{model}\s+{re.escape(method.label)}\s+\d+\s+[\d.]+\s+[\d.]+"
            assert re.search(row, table, flags=re.M), f"no row for {model}/{method.label}"
            assert f"| {model} | {method.label} |" in report
    for model in MODELS:  # per-layer rates: PartitionedNewton's are still in warm-up here
        assert f"### {model}: PartitionedNewton\n\nNo learning rates yet" in report
        assert f"![{model}: Adam+PerLayerLR]({model}-adam-plr-rates.png)" in report
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / image).is_file(), f"report.md shows a missing image {image}"


def test_report_verb_on_a_user_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "user_factories.py").write_text(
        "import torch\n"
        "from torch import nn\n\n"
        "def model():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))\n\n"
        "def batch():\n"
        "    g = torch.Generator().manual_seed(1)\n"
        "    return torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    main(["report", "--model", "user_factories:model", "--data", "user_factories:batch",
          "--out", "out"])
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert (tmp_path / "out" / "model-reduced-hessian.png").stat().st_size > 0
    assert (tmp_path / "out" / "model-kronecker-vs-ggn.png").stat().st_size > 0
    for layer in ("| 0 |", "| 2 |", "KFAC vs ExactGGN", "TEKFAC vs ExactGGN"):
        assert layer in report
    assert "report written to" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["demo", "--methods", "kfac,lbfgs"], "unknown method"),
    (["demo", "--models", "resnet"], "unknown model"),
    (["demo", "--epochs", "0"], "must be ≥ 1"),
    (["demo", "--device", "cuda"], "CUDA is not available"),
    (["demo", "--device", "gpu0"], "--device 'gpu0'"),
    (["report", "--model", "nocolon", "--data", "x:y"], "must look like module:factory"),
    (["report", "--model", "no_such_module_xyz:f", "--data", "x:y"], "cannot import"),
    (["report", "--model", "torch:no_such_factory", "--data", "x:y"], "no callable"),
    (["report", "--model", "a:b", "--data", "c:d", "--damping", "-1"], "finite number ≥ 0"),
])
def test_command_line_errors(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The first python block of the README runs as printed and trains."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", readme, flags=re.S)
    assert code is not None, "README.md has no python example"
    assert len(code.group(1).strip().splitlines()) <= 20
    exec(compile(code.group(1), "README.md", "exec"), {})
    first, last = (float(v) for v in re.findall(r"loss ([\d.]+) → ([\d.]+)",
                                                 capsys.readouterr().out)[0])
    assert last < first
