"""The benchmark scripts run (tiny settings) and write the JSON they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_vs_lightly_smoke(tmp_path):
    pytest.importorskip("lightly")
    out = tmp_path / "tp.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput_vs_lightly.py"), "--methods", "simclr,swav",
           "--backbone", "convnet_tiny", "--size", "16", "--batch", "8", "--rounds", "2", "--steps", "1",
           "--warmup", "0", "--amp", "--json", str(out)]  # bf16 autocast runs on the CPU too
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["simclr", "swav"]
    for r in rows:
        assert r["ours_img_s"] > 0 and r["lightly_img_s"] > 0
        assert r["ratio"] == pytest.approx(r["lightly_step_s"] / r["ours_step_s"])
    assert "| simclr |" in result.stdout


def test_memory_format_smoke(tmp_path):
    pytest.importorskip("lightly")  # the step builders live beside the lightly comparison
    out = tmp_path / "mf.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory_format.py"), "--methods", "simclr,swav",
           "--backbone", "convnet_tiny", "--size", "16", "--threads", "1", "--batches", "8", "--rounds", "2",
           "--steps", "1", "--warmup", "0", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["threads"], r["batch"]) for r in rows] == [("simclr", 1, 8), ("swav", 1, 8)]
    for r in rows:
        assert r["speedup"] == pytest.approx(r["nhwc_img_s"] / r["nchw_img_s"])
        assert r["speedup_ci95"][0] <= r["speedup_ci95"][1]
    assert "| 1 | 8 | swav |" in result.stdout
