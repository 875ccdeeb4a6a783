"""What a person finds on the Ray dashboard: our named actors (Actors page, through the state API the
dashboard serves) and our metrics (each node's Prometheus endpoint, which the dashboard's Metrics
page and Grafana read). The demo prints it and puts it in its JSON summary. With ``--screenshot``
the demo also opens the Actors page in headless Chromium (DevTools protocol over aiohttp, logged in
with the cluster's token) and reads the rows a person sees."""
from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
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


def free_port(preferred: int = 0) -> int:
    """``preferred`` if nothing listens there on this machine, else a free port the OS picks."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    return preferred


def _token() -> str | None:
    """This cluster's authentication token as Ray loaded it (``None``: token auth is off)."""
    try:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        if loader.has_token():
            header = next(iter(loader.get_token_for_http_header().values()))
            return header.split(" ", 1)[1] if header.lower().startswith("bearer ") else header
    except Exception:  # noqa: BLE001 - private API moved: fall back to the default token file
        pass
    from pathlib import Path

    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.read_text().strip() if path.exists() else None


def browser_check(url: str, screenshot: str | None = None, settle_s: float = 8.0, timeout_s: float = 60.0) -> dict:
    """Open the dashboard's Actors page in headless Chromium (with the cluster's token as the
    dashboard's own login would set it) and read what a person sees there.

    Returns ``{"actors": {name: the row's text}, "png": path or None}``; raises ``RuntimeError``
    when Chromium is not installed or the page does not load."""
    return asyncio.run(asyncio.wait_for(_browse(url, screenshot, settle_s), timeout_s))


async def _browse(url: str, screenshot: str | None, settle_s: float) -> dict:
    import aiohttp  # comes with ray[default] (the dashboard's own server)

    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        raise RuntimeError("no chromium / google-chrome on PATH: the browser check needs one")
    base = url if url.startswith("http") else f"http://{url}"
    profile = tempfile.mkdtemp(prefix="ray-eplb-chromium-")
    # Port 0: Chromium binds a free DevTools port itself and writes it to the profile (no
    # check-then-bind race). Its own session, so every process it forks ends with it.
    proc = subprocess.Popen(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--window-size=1600,1000", "about:blank"],
        # Its temporary files (singleton sockets) inside the profile too: one folder to remove.
        env={**os.environ, "TMPDIR": profile},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port = await _devtools_port(profile, proc)
        async with aiohttp.ClientSession() as http:
            for _ in range(100):  # the DevTools endpoint answers within a few seconds
                try:
                    async with http.get(f"http://127.0.0.1:{port}/json") as r:
                        tabs = await r.json()
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.2)
            else:
                raise RuntimeError("chromium's DevTools endpoint did not come up")
            page = next(t for t in tabs if t["type"] == "page")["webSocketDebuggerUrl"]
            async with http.ws_connect(page, max_msg_size=0) as ws:
                return await _read_actors_page(ws, base, screenshot, settle_s)
    finally:
        end_browser(proc, profile)


async def _devtools_port(profile: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """The DevTools port Chromium chose (first line of ``DevToolsActivePort`` in its profile)."""
    path = os.path.join(profile, "DevToolsActivePort")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before its DevTools endpoint came up")
        try:
            with open(path) as f:
                first = f.readline().strip()
            if first.isdigit():
                return int(first)
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"chromium wrote no DevTools port within {timeout_s:g} s")


def end_browser(proc: subprocess.Popen, profile: str) -> None:
    """End Chromium's whole process group (its renderers and helpers too), then remove its profile
    (removing it while a helper still writes there failed with 'Directory not empty')."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for _ in range(50):
        shutil.rmtree(profile, ignore_errors=True)
        if not os.path.exists(profile):
            return
        time.sleep(0.1)


async def _read_actors_page(ws, base: str, screenshot: str | None, settle_s: float) -> dict:
    calls = iter(range(1, 1 << 30))

    async def call(method: str, **params) -> dict:
        n = next(calls)
        await ws.send_json({"id": n, "method": method, "params": params})
        while True:
            msg = await ws.receive_json()
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"chromium {method}: {msg['error']}")
                return msg.get("result", {})

    token = _token()
    if token:  # what the dashboard's token dialog stores after POST /api/authenticate
        await call("Network.enable")
        await call("Network.setCookie", name="ray-authentication-token", value=token, url=base)
    await call("Page.enable")
    await call("Page.navigate", url=f"{base}/#/actors")
    async def page_text() -> str:
        got = await call("Runtime.evaluate", expression="document.body.innerText", returnByValue=True)
        return got["result"]["value"]

    deadline = time.monotonic() + settle_s
    text = ""
    while time.monotonic() < deadline:  # the page fills its table from the state API
        await asyncio.sleep(1.0)
        text = await page_text()
        if "ray_eplb_controller" in text:
            await asyncio.sleep(1.0)  # let the rest of the rows render
            text = await page_text()
            break
    rows = {}
    for line in text.splitlines():
        m = re.search(r"\b(ray_eplb_(?:controller|worker_\d+))\b", line)
        if m:
            rows[m.group(1)] = " ".join(line.split())
    png = None
    if screenshot:
        shot = await call("Page.captureScreenshot", format="png")
        with open(screenshot, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        png = screenshot
    return {"actors": rows, "png": png, "auth": bool(token),
            "login_dialog": "Authentication Token Required" in text}
