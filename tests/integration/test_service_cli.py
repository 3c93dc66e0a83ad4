"""`knnssd serve` as a user runs it (the README's first command), then the README's own curl and `openai`
examples run as written against it (only the port differs), then Ctrl-C shuts everything down cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from router.redis_server import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def readme_block(lang: str, must_contain: str) -> str:
    for body in re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S):
        if must_contain in body:
            return body
    raise AssertionError(f"no ```{lang} block with {must_contain!r} in README.md")


def index_for_test(tmp_path: Path) -> str | None:
    """The shipped default index when there is one (None: serve uses it by itself), else a small real one."""
    from index.artefact import ArtefactError, load_artefact
    from services.config import AppConfig
    from services.routing import resolve_index_root

    try:
        load_artefact(resolve_index_root(AppConfig()))
        return None
    except (ArtefactError, OSError):
        sys.path.insert(0, str(Path(__file__).parent))
        from index.embed import MiniLMEmbedder
        from test_service_app import CONFIGS, write_index

        write_index(tmp_path / "index", MiniLMEmbedder(progress=False), CONFIGS, per_domain=4)
        return str(tmp_path / "index")


def _is_loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def listening_sockets(pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of `pid` and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    names = {p.pid: p.name() for p in [root, *root.children(recursive=True)]}
    return sorted((c.laddr.ip, c.laddr.port, names[c.pid]) for c in psutil.net_connections("inet")
                  if c.status == psutil.CONN_LISTEN and c.pid in names)


def assert_ray_is_private(pid: int) -> None:
    """Issue 13, finding 1: every port of the local Ray (GCS, raylet, workers, agents, proxy) is on loopback,
    and the dashboard agent's job API (which runs commands) refuses a request without the Ray token."""
    import httpx

    sockets = listening_sockets(pid)
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names and any("DashboardAgent" in n for n in names), sockets
    exposed = [s for s in sockets if not _is_loopback(s[0])]
    assert exposed == [], f"Ray listens beyond loopback: {exposed}"
    answers = []
    for ip, port, name in sockets:
        if "DashboardAgent" in name:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/api/job_agent/jobs/", json={"entrypoint": "id"}, timeout=5)
                answers.append(r.status_code)
            except httpx.HTTPError:
                pass  # a gRPC port
    assert 401 in answers and not any(200 <= a < 300 for a in answers), answers


def test_knnssd_serve_and_the_readme_examples(redis_url, tmp_path):
    import redis

    assert ".venv/bin/knnssd serve" in readme_block("bash", "docker/install.sh && .venv/bin/knnssd serve")
    curl = readme_block("bash", "curl -s http://127.0.0.1:8000/v1/completions")
    client_code = readme_block("python", "from openai import OpenAI")

    port = free_port()
    prefix = f"test:{uuid.uuid4().hex[:10]}:knnssd:"
    cfg: dict = {"redis_url": redis_url, "redis_prefix": prefix}
    index_path = index_for_test(tmp_path)
    if index_path:
        cfg["index_path"] = index_path
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.pop("KNNSSD_DEV_KEY", None)
    out_path = tmp_path / "serve.log"
    with open(out_path, "w") as out_file:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "knnssd"), "serve", "--config", str(tmp_path / "config.yaml"),
             "--port", str(port)],
            cwd=ROOT, env=env, stdout=out_file, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops it" not in out_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out_path.read_text()[-3000:]
            time.sleep(0.5)
        out = out_path.read_text()
        assert "API key: sk-knnssd-dev" in out and f"http://127.0.0.1:{port}/v1" in out, out[-3000:]
        up = re.search(r"KNN-SSD serving is up in (\d+) s", out)  # the README quotes this line
        assert up, out[-3000:]
        print(f"\nknnssd serve: up in {up.group(1)} s")
        assert_ray_is_private(proc.pid)

        # The README's curl example, as written but for the port.
        res = subprocess.run(["bash", "-c", curl.replace(":8000", f":{port}")], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        body = json.loads(res.stdout)
        assert body["choices"][0]["text"].strip() and body["usage"]["completion_tokens"] >= 1, res.stdout
        assert body["knnssd"]["domain"] and body["knnssd"]["index_version"], res.stdout

        # The README's openai client example, likewise.
        res = subprocess.run([sys.executable, "-c", client_code.replace(":8000", f":{port}")], capture_output=True,
                             text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.strip() and "completion_tokens" in res.stdout, res.stdout
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=prefix[: -len("knnssd:")] + "*"))
        if keys:
            client.delete(*keys)
        client.close()
    rest = out_path.read_text()
    assert proc.returncode == 0 and "stopped." in rest, rest[-3000:]
