"""Run in a fresh process (its own HOME): a two-raylet cluster built like the demo's
(``ray.cluster_utils.Cluster``, token auth turned on by :func:`enable_token_auth`), then what a
client gets from its dashboard API and GCS with the token, without it, and with a wrong one.
Prints one JSON line."""
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DRIVER = "import ray; ray.init(address={addr!r}, log_to_driver=False); print('CONNECTED', ray.cluster_resources().get('CPU'))"


def http_status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        return urllib.request.urlopen(req, timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


def driver(addr: str, home: Path, **env: str) -> dict:
    """A separate driver process joining ``addr`` with ``HOME=home`` and no auth settings but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    home.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run([sys.executable, "-c", DRIVER.format(addr=addr)], capture_output=True, text=True,
                             timeout=45, env={**clean, "HOME": str(home), **env})
        return {"connected": "CONNECTED" in out.stdout, "rc": out.returncode, "err": (out.stderr.strip().splitlines() or [""])[-1]}
    except subprocess.TimeoutExpired:
        return {"connected": False, "rc": None, "err": "timed out"}


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from ray_eplb.controller.cli.auth import enable_token_auth
    from ray_eplb.controller.cli.dashboard import dashboard_args

    where = enable_token_auth()
    token = Path(where).read_text().strip()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, **dashboard_args(), object_store_memory=100 * 2**20))
    cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    out: dict = {"token_file": where, "env_mode": os.environ.get("RAY_AUTH_MODE")}
    try:
        ctx = ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        out["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
        url = f"http://{ctx.dashboard_url}/api/v0/actors"
        deadline = time.monotonic() + 30
        while http_status(url, token) != 200 and time.monotonic() < deadline:  # the dashboard comes up after ray.init
            time.sleep(1)
        out["http"] = {"with_token": http_status(url, token), "without": http_status(url, None),
                       "wrong_token": http_status(url, "not-the-token")}
        stranger = Path(os.environ["HOME"]).parent / "stranger"
        out["drivers"] = {
            "without_token": driver(cluster.address, stranger),
            "without_token_auth_mode_token": driver(cluster.address, stranger, RAY_AUTH_MODE="token"),
            "wrong_token": driver(cluster.address, stranger, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token"),
            "with_token": driver(cluster.address, stranger, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
