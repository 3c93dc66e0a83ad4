"""`scripts/gpu_check.sh`, the one prepared GPU check, run here with the CPU standing in for CUDA.

What is device-independent is checked: the steps run from the source tree with a given python (no venv
scripts, `python -m deploy`), every step's status is recorded and a failing step does not stop the rest,
the benches' draft configs fit the GPU model's 24 layers, and a torch wheel is never installed over the
machine's own. What the GPU changes (kernels, timings) is the check's job on a GPU machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import DraftConfig
from engine.random_model import random_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_the_checks_draft_configs_fit_the_gpu_models_layers():
    """bench engine once ran SmolLM2's skip sets (layers up to 27) on the 24-layer Qwen and refused them."""
    layers = random_config("random:qwen2.5-coder-0.5b").num_hidden_layers
    assert layers == 24 == random_config("random:qwen2.5-coder-0.5b-mini").num_hidden_layers
    text = SCRIPT.read_text()
    assert "--config scripts/gpu_check_configs.json" in text
    configs = json.loads((ROOT / "scripts" / "gpu_check_configs.json").read_text())
    serve = re.search(r"SERVE_CONFIG=\$\{GPU_CHECK_SERVE_CONFIG:-'(.*)'\}", text).group(1)
    for cfg in [*configs.values(), json.loads(serve)]:
        DraftConfig.model_validate(cfg).check(layers)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert ".venv" not in text.split("set -uo pipefail")[1]  # nothing from a venv: the machine's python runs it


@pytest.mark.slow
def test_gpu_check_runs_every_step_from_the_source_tree_on_the_cpu(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-9.9.9-cp312-cp312-linux_x86_64.whl").write_bytes(b"not a wheel")  # must be refused
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KNNSSD_", "GPU_CHECK_"))} | {
        "PYTHON": sys.executable, "OUT": str(out), "KNNSSD_GPU_DEVICE": "cpu",
        "KNNSSD_GPU_MODEL": "random:qwen2.5-coder-0.5b-mini", "GPU_CHECK_WHEELS": str(wheels),
        "GPU_CHECK_TOKENS": "8", "GPU_CHECK_LIMIT": "1", "GPU_CHECK_CONCURRENCY": "1,2", "GPU_CHECK_REQUESTS": "2",
        "GPU_CHECK_THREADS": "2", "GPU_CHECK_BUDGET_S": "900",
    }
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    log = (out / "check.log").read_text()
    rows = [line.split("\t") for line in (out / "status.tsv").read_text().splitlines()[1:]]
    status = {name: int(rc) for name, rc, _ in rows}
    assert list(status) == ["wheels", "env", "probe", "gpu-tests", "bench-engine", "bench-serve"], log[-3000:]
    assert status["wheels"] != 0 and "refusing" in log  # the machine's torch is never replaced
    assert all(status[s] == 0 for s in list(status)[1:]), log[-4000:]  # the failed first step stopped nothing
    assert proc.returncode == 1  # ...but the check as a whole reports it
    assert json.loads((out / "probe.json").read_text())["engine_rows_invariant"]
    engine_report = json.loads((out / "bench-engine.json").read_text())
    assert set(engine_report["configs"]) == set(json.loads((ROOT / "scripts" / "gpu_check_configs.json").read_text()))
    assert all(engine_report["table"][m]["overall"]["identical"] for m in engine_report["table"] if m != "hf-generate")
    serve_report = json.loads((out / "bench-serve.json").read_text())
    assert {r["mode"] for r in serve_report["results"]} == {"serial", "batched-plain", "batched-spec"}
    assert all(r["identical"] for r in serve_report["results"])
    assert len(list(out.iterdir())) <= 8  # the device tool returns at most 8 files
