"""lmloss.grounding.the examples/grounding_demo.py smoke run.

Truth: the demo's results are IoUs in [0, 1] and finite losses.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

# ---------------------------------------------------------------------- demo


def test_grounding_demo_smoke(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parents[2] / "examples" / "grounding_demo.py"
    spec = importlib.util.spec_from_file_location("grounding_demo", path)
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "grounding_demo", demo)  # dataclasses look their module up
    spec.loader.exec_module(demo)
    out = tmp_path / "results.json"
    demo.main(["--steps", "3", "--seeds", "1", "--eval-images", "8", "--out", str(out)])
    results = json.loads(out.read_text())
    for variant in ("ce", "ce+box"):
        runs = results["variants"][variant]["runs"]
        assert len(runs) == 1 and 0.0 <= runs[0]["mean_iou"] <= 1.0
        assert math.isfinite(runs[0]["final_loss"])
