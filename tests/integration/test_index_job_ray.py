"""`ray job submit ... -- python -m index.job` against a local Ray head started (and stopped) here.

The head runs in its own process group with its own ports and temp dir, so it never touches another
Ray cluster on the machine; it is stopped by signalling that group only (never `ray stop`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from index import artefact as A
from index.publish import read_published

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def ray_head():
    gcs, dash, client, agent = _free_ports(4)
    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray puts unix sockets under it
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", f"--temp-dir={tmp}", "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(tmp) / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (Path(tmp) / "head.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Ray head did not come up"
            time.sleep(1)
        yield url
    finally:
        # Our own process group only: `ray start --block` shuts its children down on SIGTERM.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(url: str, *job_args: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".", "--", "python", "-m", "index.job", *job_args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=800)


def test_ray_job_builds_and_publishes(ray_head, tmp_path, redis_url, redis_prefix):
    data = tmp_path / "data"
    data.mkdir()
    for d in ("math", "code"):
        lines = (REPO / "index/data/default" / f"{d}.jsonl").read_text().splitlines()[:4]
        (data / f"{d}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    common = ["--out", str(out), "--budget", "2", "--screen-prompts", "1", "--measure-prompts", "1", "--n-measure", "1",
              "--max-new-tokens", "8", "--layer-profile-prompts", "1", "--workers", "2",
              "--redis-url", redis_url, "--redis-prefix", redis_prefix, "--no-progress"]  # fmt: skip

    r = _submit(ray_head, "--data", str(data), *common)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "succeeded" in (r.stdout + r.stderr)
    art = A.load_artefact(out, expect_embedder_id="minilm:all-MiniLM-L6-v2")
    assert set(art.manifest.domains) == {"math", "code"}
    published = read_published(redis_url, prefix=redis_prefix)
    assert published == {"version": art.version, "path": str(art.path.resolve())}
    search = json.loads((art.path / "search.json").read_text())
    assert all(len(d["layer_agreement"]) > 0 for d in search["domains"].values())

    # a failing build: non-zero, CURRENT and the published key untouched
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "math.jsonl").write_text('{"prompt": "ok"}\n{broken\n')
    r2 = _submit(ray_head, "--data", str(bad), *common)
    assert r2.returncode != 0
    assert "math.jsonl:2" in (r2.stdout + r2.stderr)
    assert A.current_version(out) == art.version and A.list_versions(out) == [art.version]
    assert read_published(redis_url, prefix=redis_prefix) == published
