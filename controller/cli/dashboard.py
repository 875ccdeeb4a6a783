"""What a person finds on the Ray dashboard: our named actors (Actors page, through the state API the
dashboard serves) and our metrics (each node's Prometheus endpoint, which the dashboard's Metrics
page and Grafana read). The demo prints it and puts it in its JSON summary. With ``--screenshot``
the demo also opens the Actors page and the controller's log page in headless Chromium, logged in
with the cluster's token (:mod:`ray_eplb.controller.cli.browser`)."""
from __future__ import annotations

import re
import time
import urllib.request

from ray_eplb.controller.cli.browser import EPOCH_LINE, browser_check, end_browser  # noqa: F401 - re-exported

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

        # This cluster's address: with another cluster on the machine an address-less call is refused.
        address = ray.get_runtime_context().gcs_address
        for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False):
            if (a.name or "").startswith(PREFIX):
                out["actors"][a.name] = a.repr_name
    except Exception as exc:  # noqa: BLE001 - no dashboard on this cluster: say so
        out["errors"].append(f"state API: {exc!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        names: set[str] = set()
        errors = []  # of this scrape only: a retry replaces them
        for node in ray.nodes():
            port = node.get("MetricsExportPort")
            if not node.get("Alive") or not port:
                continue
            url = f"http://{node['NodeManagerAddress']}:{port}/metrics"
            try:
                text = urllib.request.urlopen(url, timeout=5).read().decode()
            except OSError as exc:
                errors.append(f"metrics {url}: {exc!r}")
                continue
            names.update(m.group(1) for line in text.splitlines() if (m := METRIC.match(line)))
        out["metrics"] = sorted(names)
        if all(w in names for w in wait_metrics) or time.monotonic() >= deadline:
            out["errors"] += errors
            return out
        time.sleep(1.0)


def check_live(controller, screenshot: str | None = None) -> dict:
    """The demo's look at the dashboard: :func:`inspect` while the controller's loop runs (its rounds
    keep the gauges on the endpoint), then the loop stopped (no epoch after this, so the log page
    is complete), then with ``screenshot`` the :func:`browser_check` (``"browser"``, or
    ``"browser_error"`` naming what failed)."""
    import ray

    dash = inspect(("ray_eplb_epoch", "ray_eplb_balancedness", "ray_eplb_rebalances_total"))
    ray.get(controller.stop.remote())
    if screenshot:
        try:
            dash["browser"] = browser_check(dash["url"] or "127.0.0.1:8265", screenshot)
        except (RuntimeError, OSError) as exc:
            dash["browser_error"] = str(exc)
            dash["errors"].append(f"browser: {exc}")
    return dash


def dashboard_summary(dash: dict, history: list[dict]) -> dict:
    """The demo summary's ``dashboard``: what :func:`check_live` found, and the epochs the
    controller's history holds (``epochs``), which its log page should show one line each."""
    epochs = {kind: sorted(h["epoch"] for h in history if h.get("action") == kind) for kind in ("committed", "aborted")}
    out = {"url": dash["url"], "actors": sorted(dash["actors"]), "metrics": dash["metrics"], "epochs": epochs}
    b = dash.get("browser")
    if b is not None:
        log = b["log"]
        out["browser"] = {"actors": sorted(b["actors"]), "seconds": b["seconds"], "png": b["png"],
                          "log_png": b["log_png"],
                          "log": {"page": log["page"], "lines": len(log["lines"]), "filtered": log["filtered"],
                                  "committed": log["committed"], "aborted": log["aborted"]}}
    if "browser_error" in dash:
        out["browser_error"] = dash["browser_error"]
    return out


def report_lines(dash: dict, epochs: dict) -> list[str]:
    """What the demo prints about the dashboard."""
    metrics = ", ".join(m.removeprefix("ray_eplb_") for m in dash["metrics"])
    out = [f"[demo] dashboard {dash['url'] or '(none)'}: Actors page lists {len(dash['actors'])} ray_eplb actors, e.g. "
           f"{dash['actors'].get('ray_eplb_controller', '(controller not listed)')}; Prometheus has "
           f"{len(dash['metrics'])} ray_eplb metrics: {metrics}"]
    b = dash.get("browser")
    if b is not None:
        log = b["log"]

        def found(kind: str) -> str:
            return f"{len(set(log[kind]) & set(epochs[kind]))} of the {len(epochs[kind])} {kind} epochs"

        how = "logged in with the token" if b["auth"] else "no auth"
        out.append(f"[demo] headless Chromium ({how}, {b['seconds']:.1f} s): Actors page lists {len(b['actors'])} "
                   f"ray_eplb rows; the controller's Log link opens {log['page']}, whose log shows "
                   f"{len(log['lines'])} balancer lines, naming {found('committed')} and {found('aborted')}; "
                   f"screenshots {b['png'] or '-'}, {b['log_png'] or '-'}")
    out += [f"[demo] dashboard check: {err}" for err in dash["errors"][:3]]
    return out


def dashboard_args() -> dict:
    """``ray.init`` / ``Cluster`` head-node arguments for a dashboard on 8265, or the next port up when
    that is taken. With no port given, Ray's dashboard process binds the port itself and, on a bind
    failure, tries the next one (up to 50 more); the address it got is read back from the cluster
    (``ray._private.worker.get_dashboard_url()``). A port we picked as free beforehand is checked by
    Ray and bound later by the dashboard process: a program taking it in between failed the start."""
    return {"include_dashboard": True, "dashboard_port": None}
