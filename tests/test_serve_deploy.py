"""`serve deploy` of deploy/serve_config.yaml, run, not only parsed: a Ray cluster started with `ray
start`, the config file as shipped with only what a CPU machine needs changed (CPU replicas of the
tiny model, a local port), deployed with Ray's own CLI; programs are served through it and it shuts
down with nothing left behind. The program options are the file's own, which are the options
module's defaults (tests/test_deploy_config.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).parent.parent / "deploy" / "serve_config.yaml"
HTTP_PORT, GCS_PORT, DASHBOARD_PORT = 8127, 6391, 8271


def _bin(name: str) -> str:
    import sys

    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name)


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    # a cluster of its own (not RAY_ADDRESS's), on localhost only: no token auth, whatever ~/.ray holds
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def cpu_config(tmp_path: Path) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": HTTP_PORT}
    app = config["applications"][0]
    app["args"].update(replicas=2, accelerator="cpu", model_id="tiny",
                       engine={"model": "tiny", "kv_tokens": 4096, "max_model_len": 2048, "max_num_seqs": 8})
    path = tmp_path / "serve_config_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def get(path: str, body: dict | None = None) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{HTTP_PORT}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), {}
    except (urllib.error.URLError, ConnectionError):
        return 0, {}, {}


def test_serve_deploy_of_the_shipped_config_serves_programs(tmp_path):
    config = cpu_config(tmp_path)
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    started = run(_bin("ray"), "start", "--head", f"--port={GCS_PORT}", f"--dashboard-port={DASHBOARD_PORT}",
                  "--num-cpus=8", "--include-dashboard=true", "--disable-usage-stats")
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        deployed = run(_bin("serve"), "deploy", str(config), "--address", address, timeout=300)
        assert deployed.returncode == 0, deployed.stderr[-2000:]
        deadline = time.monotonic() + 600
        while get("/health")[0] != 200:
            assert time.monotonic() < deadline, run(_bin("serve"), "status", "--address", address).stdout
            time.sleep(3)
        replicas = set()
        for turn in range(4):
            status, headers, out = get("/v1/chat/completions", {
                "model": "tiny", "max_tokens": 2, "temperature": 0,
                "messages": [{"role": "user", "content": f"program {turn} " * 30}],
                "agentserve": {"program_id": f"deployed-{turn}"}})
            assert status == 200, out
            replicas.add(headers["x-agentserve-replica"])
        assert len(replicas) == 2  # new programs spread over the two replicas
        _, _, stats = get("/v1/agentserve/stats")
        assert len(stats["replicas"]) == 2 and stats["programs"] >= 4
        assert all(r["scheduler"] == "ProgramScheduler" for r in stats["replicas"].values())
        for turn in range(4):
            assert get(f"/v1/programs/deployed-{turn}/end", {})[0] == 200
    finally:
        run(_bin("serve"), "shutdown", "-y", "--address", address, timeout=120)
        run(_bin("ray"), "stop", "--force", timeout=120)
