"""benchmarks/toggle_format.py --pool: per-difficulty format rates added up over problem seeds and wordings."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import toggle_format  # noqa: E402


def _result(phrasing: str, cells: dict[str, float], mode: str = "on") -> dict:
    return {"argv": [], "runs": [{"model": "m", "mode": mode, "phrasing": phrasing, "per_cell": 100,
                                  "cells": {k: {"format_ok": v, "accuracy": 0.5} for k, v in cells.items()}}]}


def test_pool_adds_up_each_difficulty_over_files_and_wordings(tmp_path):
    files = [_result("canonical", {"add/1d": 1.0, "mul/3d": 0.98}), _result("held_out", {"add/1d": 1.0, "mul/3d": 1.0}),
             _result("canonical", {"add/1d": 0.99, "mul/3d": 0.97})]
    pooled = toggle_format.pool(files)["m"]["on"]
    assert pooled["difficulties"]["mul/3d"]["ok"] == 295 and pooled["difficulties"]["mul/3d"]["n"] == 300
    assert pooled["difficulties"]["add/1d"]["ok"] == 299
    assert pooled["worst_difficulty"] == "mul/3d" and pooled["worst_wording"] == "canonical"
    assert pooled["wordings"]["held_out"]["format_ok"] == 1.0 and pooled["all"]["n"] == 600
    lo, hi = pooled["difficulties"]["mul/3d"]["ci95"]
    assert lo < 295 / 300 < hi
    # the command line writes the same and names the files
    paths = []
    for i, f in enumerate(files):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(f))
    out = tmp_path / "pooled.json"
    assert toggle_format.main(["--pool", *map(str, paths), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["files"] == [str(p) for p in paths] and written["pooled"]["m"]["on"] == pooled


def test_wilson_interval_brackets_the_rate():
    assert toggle_format.wilson(0, 0) == (0.0, 1.0)
    lo, hi = toggle_format.wilson(594, 600)
    assert lo < 0.99 < hi < 1.0
