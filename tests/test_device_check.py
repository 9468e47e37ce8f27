"""`benchmarks/device_check.sh --smoke`: the prepared accelerator check runs end to end on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_check_smoke(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), "--smoke",
                           "--out", str(tmp_path), "--budget-s", "150"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    (json_path,) = tmp_path.glob("*-smoke.json")
    assert json_path.with_suffix(".png").exists()
    result = json.loads(json_path.read_text())
    assert result["smoke"] is True and result["device"]["platform"] == "cpu"
    assert result["tests"]["returncode"] == 0  # `-m device` selects the device tests
    assert result["peak"]["jax_float32_tflops"] > 0
    rates = [r for r in result["throughput"] if "rate" in r]
    assert {r["backend"] for r in rates} >= {"device", "reference"}  # the first points
    assert all("rate" in r or r.get("skipped") for r in result["throughput"])
    assert all(r["rate"] > 0 and "device_flops_per_image" in r for r in rates)
    assert "argmax_agreement" in result["dtypes"].get("tensorfloat32", {}) or \
        result["dtypes"].get("tensorfloat32", {}).get("skipped")
    gen = result["generation"]
    assert gen["generation_s"] > 0 and gen["classes"] == 10 and "compile_s" in gen
    assert result["machine"]["load_average_before"] and result["date"]
