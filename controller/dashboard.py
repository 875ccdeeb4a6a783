"""What a person finds on the Ray dashboard: our named actors (Actors page, through the state API the
dashboard serves) and our metrics (each node's Prometheus endpoint, which the dashboard's Metrics
page and Grafana read). The demo prints it and puts it in its JSON summary."""
from __future__ import annotations

import re
import time
import urllib.request

PREFIX = "ray_eplb_"
METRIC = re.compile(r"^(ray_eplb_\w+?)(?:_bucket|_sum|_count)?(?:\{|\s)")


def inspect(wait_metrics: tuple[str, ...] = ("ray_eplb_epoch",), timeout_s: float = 15.0) -> dict:
    """``{"url", "actors": {name: repr}, "metrics": [names], "errors": [...]}``; waits up to
    ``timeout_s`` for the metrics named in ``wait_metrics`` (Ray exports metrics periodically)."""
    import ray

    out: dict = {"url": None, "actors": {}, "metrics": [], "errors": []}
    try:
        out["url"] = ray._private.worker.get_dashboard_url() or None
    except Exception as exc:  # noqa: BLE001 - private API: report, do not fail the demo
        out["errors"].append(f"dashboard url: {exc!r}")
    try:
        from ray.util.state import list_actors

        for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False):
            if (a.name or "").startswith(PREFIX):
                out["actors"][a.name] = a.repr_name
    except Exception as exc:  # noqa: BLE001 - no dashboard on this cluster: say so
        out["errors"].append(f"state API: {exc!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        names: set[str] = set()
        for node in ray.nodes():
            port = node.get("MetricsExportPort")
            if not node.get("Alive") or not port:
                continue
            try:
                url = f"http://{node['NodeManagerAddress']}:{port}/metrics"
                text = urllib.request.urlopen(url, timeout=5).read().decode()
            except OSError as exc:
                out["errors"].append(f"metrics {url}: {exc!r}")
                continue
            names.update(m.group(1) for line in text.splitlines() if (m := METRIC.match(line)))
        out["metrics"] = sorted(names)
        if all(w in names for w in wait_metrics) or time.monotonic() >= deadline:
            return out
        time.sleep(1.0)
