"""The dashboard in a real browser: headless Chromium, driven over its DevTools protocol (aiohttp,
which comes with ``ray[default]``), logged in with the cluster's token as the dashboard's own login
stores it, opens the Actors page and reads the rows a person sees, then clicks the controller's Log
link and reads its log viewer (:func:`browser_check`). Chromium runs in a process group of its own,
ended afterwards, and its profile folder is removed, whatever happens; every step has a deadline
and a message naming what it waited for."""
from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time


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


def browser_check(url: str, screenshot: str | None = None, settle_s: float = 20.0, timeout_s: float = 150.0,
                  log_actor: str = "ray_eplb_controller") -> dict:
    """Open the dashboard in headless Chromium (with the cluster's token, as the dashboard's own
    login stores it) and read what a person sees: the Actors page, then the page behind the Log
    link of ``log_actor``'s row (the actor's detail page, whose log viewer shows its stderr).

    Returns ``{"actors": {name: the row's text}, "log": {"page", "lines", "committed", "aborted"},
    "png", "log_png", "auth", "login_dialog", "seconds"}``: ``log["lines"]`` are the balancer's
    lines the log viewer rendered, ``committed`` / ``aborted`` the epochs they name. ``settle_s``
    bounds each wait for a page to show what it should (a Log link without the actor's id is
    waited for twice, the page reloaded in between). Raises ``RuntimeError`` naming the step that
    failed (no Chromium, no DevTools endpoint, a page that did not show its content in time, or the
    whole check past ``timeout_s``). Chromium runs in a process group of its own, ended afterwards,
    and its profile folder is removed, whatever happens."""
    t0 = time.monotonic()

    async def bounded() -> dict:
        try:
            return await asyncio.wait_for(_browse(url, screenshot, settle_s, log_actor), timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the browser check did not finish within {timeout_s:g} s") from None

    out = asyncio.run(bounded())
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


async def _browse(url: str, screenshot: str | None, settle_s: float, log_actor: str) -> dict:
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
                raise RuntimeError("chromium's DevTools endpoint did not come up within 20 s")
            page = next(t for t in tabs if t["type"] == "page")["webSocketDebuggerUrl"]
            async with http.ws_connect(page, max_msg_size=0) as ws:
                return await _read_pages(_Tab(ws), base, screenshot, settle_s, log_actor)
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


class _Tab:
    """One Chromium tab over the DevTools protocol: each call waits at most ``CALL_TIMEOUT_S``."""

    CALL_TIMEOUT_S = 15.0

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.n += 1
        n = self.n
        await self.ws.send_json({"id": n, "method": method, "params": params})

        async def answer() -> dict:
            while True:
                msg = await self.ws.receive_json()
                if msg.get("id") == n:
                    if "error" in msg:
                        raise RuntimeError(f"chromium {method}: {msg['error']}")
                    return msg.get("result", {})

        try:
            return await asyncio.wait_for(answer(), self.CALL_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(f"chromium did not answer {method} within {self.CALL_TIMEOUT_S:g} s") from None

    async def js(self, expression: str, await_promise: bool = False):
        got = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in got:
            d = got["exceptionDetails"]
            why = d.get("exception", {}).get("description") or d.get("text")
            raise RuntimeError(f"script on the page failed: {' '.join(str(why).split())[:300]} "
                               f"(script: {' '.join(expression.split())[:200]})")
        return got["result"].get("value")

    async def until(self, expression: str, what: str, timeout_s: float):
        """Poll ``expression`` until it is truthy; ``RuntimeError`` naming ``what`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        error = None
        while True:
            try:
                value = await self.js(expression)
            except RuntimeError as exc:  # e.g. no document.body yet while the page loads: try again
                value, error = None, exc
            if value:
                return value
            if time.monotonic() >= deadline:
                shown = " ".join(str(await self.js(BODY_TEXT)).split())[:300]
                last = f"; last script error: {error}" if error else ""
                raise RuntimeError(f"{what} within {timeout_s:g} s (the page shows: {shown!r}{last})")
            await asyncio.sleep(0.5)

    async def shot(self, path: str) -> str:
        data = await self.call("Page.captureScreenshot", format="png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))
        return path


#: The text of the page, empty while it has no body yet.
BODY_TEXT = "document.body ? document.body.innerText : ''"
#: The balancer's per-epoch log lines, as the controller's handler formats them.
EPOCH_LINE = re.compile(r"\b(?:INFO|WARNING)\s+ray_eplb\.controller(?:\.\w+)*:\s+epoch\s+(\d+)\s+(committed|aborted)\b")
#: The rows of the visible log viewer (react-window renders only what is in view: scroll to read all).
_LOG_LIST = ("Array.from(document.querySelectorAll('div[class*=\"hljs-\"]'))"
             ".filter(e => e.offsetParent !== null && e.scrollHeight > 0)[0]")


async def _read_pages(tab: _Tab, base: str, screenshot: str | None, settle_s: float, log_actor: str) -> dict:
    token = _token()
    if token:  # what the dashboard's token dialog stores after POST /api/authenticate
        await tab.call("Network.enable")
        await tab.call("Network.setCookie", name="ray-authentication-token", value=token, url=base)
    await tab.call("Page.enable")
    await tab.call("Page.navigate", url=f"{base}/#/actors")
    out = {"actors": {}, "log": None, "png": None, "log_png": None, "auth": bool(token), "login_dialog": False}
    try:
        await tab.until(f"({BODY_TEXT}).includes({log_actor!r})", f"the Actors page did not list {log_actor}",
                        settle_s)
    finally:
        text = await tab.js(BODY_TEXT)
        out["login_dialog"] = "Authentication Token Required" in text
    await asyncio.sleep(1.0)  # let the rest of the rows render
    for line in (await tab.js(BODY_TEXT)).splitlines():
        m = re.search(r"\b(ray_eplb_(?:controller|worker_\d+))\b", line)
        if m:
            out["actors"][m.group(1)] = " ".join(line.split())
    if screenshot:
        out["png"] = await tab.shot(screenshot)
    out["log"] = await _read_log_page(tab, settle_s, log_actor)
    if screenshot:
        await tab.js(f"(() => {{ const l = {_LOG_LIST}; if (l) {{ l.scrollTop = 0;"
                     " l.scrollIntoView({block: 'end'}); } })()")
        await asyncio.sleep(0.3)
        stem, ext = os.path.splitext(screenshot)
        out["log_png"] = await tab.shot(f"{stem}_log{ext or '.png'}")
    return out


async def _until_log_shown(tab: _Tab, actor: str, actor_id: str, timeout_s: float) -> None:
    """Wait for the log viewer to show lines; on 'Failed to load' press its Refresh button (the log
    is fetched from the agent of the actor's node, which can answer late). A timeout names what the
    Logs section shows and what the log API itself answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = await tab.js(
            f"(() => {{ const l = {_LOG_LIST}; if (l && l.innerText.trim().length > 0) return 'lines';"
            f" const t = {BODY_TEXT}; if (!t.includes('Failed to load')) return 'wait';"
            " const b = Array.from(document.querySelectorAll('button')).find(b => b.offsetParent !== null &&"
            " b.textContent.trim().toLowerCase() === 'refresh'); if (b) b.click(); return 'failed'; })()")
        if state == "lines":
            return
        await asyncio.sleep(1.0 if state == "failed" else 0.5)
    text = str(await tab.js(BODY_TEXT))
    logs = " ".join(text[text.rfind("Logs"):].split())[:300]
    api = await tab.js(
        f"fetch('api/v0/logs/file?actor_id={actor_id}&suffix=err&lines=20').then(async r => r.status + ' '"
        " + (await r.text()).slice(0, 300)).catch(e => 'fetch failed: ' + e)", await_promise=True)
    raise RuntimeError(f"the log viewer of {actor} showed no lines within {timeout_s:g} s (its Logs section shows: "
                       f"{logs!r}; the log API answers: {' '.join(str(api).split())!r})")


def _row_js(actor: str) -> str:
    """A script that finds ``actor``'s row on the Actors page (``row``) and its Log link (``a``)."""
    return ("const row = Array.from(document.querySelectorAll('tr'))"
            f".find(r => r.innerText.split(/\\s+/).includes({actor!r}));"
            " const a = row && Array.from(row.querySelectorAll('a')).find(a => a.textContent.trim() === 'Log');")


async def _click_log_link(tab: _Tab, settle_s: float, actor: str) -> str:
    """Click the Log link of ``actor``'s row once it carries the actor's own id; returns its href.

    A row can show a link to the nil actor id (all f) before the actor's own id has loaded: it opens
    an empty page whose log never comes, so the real one is waited for. Where it has not come
    within ``settle_s`` (seen on a loaded CI machine), the page is loaded again, as a person would
    reload it, and waited for once more; the error then names what the row showed both times."""
    click = ("(() => { " + _row_js(actor) + " const h = a && (a.getAttribute('href') || a.href);"
             " if (!h || /actors\\/f+(?![0-9a-f])/.test(h)) return null; a.click(); return h; })()")
    shown = ("(() => { " + _row_js(actor) + " return row ? row.innerText.split(/\\s+/).join(' ').slice(0, 200)"
             " + ' | Log link: ' + (a ? (a.getAttribute('href') || a.href) : 'none') : 'no row'; })()")
    what = f"the Actors page showed no Log link with an actor id in the row of {actor}"

    async def row_shown() -> str:
        try:
            return str(await tab.js(shown))
        except RuntimeError as exc:
            return f"(unreadable: {exc})"

    try:
        return await tab.until(click, what, settle_s)
    except RuntimeError:
        before = await row_shown()
    await tab.call("Page.reload")
    await tab.until(f"({BODY_TEXT}).includes({actor!r})", f"the reloaded Actors page did not list {actor}", settle_s)
    try:
        return await tab.until(click, what, settle_s)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; the row showed {before!r} before a reload and {await row_shown()!r} after "
                           "it") from None


async def _read_log_page(tab: _Tab, settle_s: float, actor: str) -> dict:
    """Click the Log link of ``actor``'s row on the Actors page, then read the lines its log viewer
    renders (its first tab: the actor's stderr, where the balancer logs), filtered by the viewer's
    own Keyword field to the balancer's lines and scrolled through."""
    href = await _click_log_link(tab, settle_s, actor)
    page = await tab.until("/#\\/actors\\/[0-9a-f]+/.test(location.hash) && !/actors\\/f+(?![0-9a-f])/"
                           ".test(location.hash) && location.hash",
                           f"the Log link of {actor} ({href}) did not open the actor's page", settle_s)
    await _until_log_shown(tab, actor, page.rsplit("/", 1)[-1], 2 * settle_s)
    # The viewer's Keyword field (a person's search): keep the balancer's lines only.
    field = await tab.js(
        "(() => { const i = Array.from(document.querySelectorAll('input')).find(i => i.offsetParent !== null &&"
        " i.closest('.MuiFormControl-root')?.querySelector('label')?.textContent.trim() === 'Keyword');"
        " if (!i) return false; i.focus(); return true; })()")
    if field:
        await tab.call("Input.insertText", text="ray_eplb.controller")
        await asyncio.sleep(1.0)  # the viewer applies a keyword after 0.5 s
    lines: list[str] = []
    deadline = time.monotonic() + settle_s
    top = 0
    while time.monotonic() < deadline:
        view = await tab.js(
            f"(() => {{ const l = {_LOG_LIST}; if (!l) return null; l.scrollTop = {top}; "
            "return [l.scrollTop, l.clientHeight, l.scrollHeight]; })()")
        if view is None:
            raise RuntimeError(f"the log viewer of {actor} went away while it was read")
        await asyncio.sleep(0.3)  # the list renders the rows now in view
        rows = await tab.js(f"(() => {{ const l = {_LOG_LIST}; return l ? l.innerText : ''; }})()")
        lines += [" ".join(r.split()) for r in rows.splitlines() if r.strip() and " ".join(r.split()) not in lines]
        scroll_top, height, total = view
        if scroll_top + height >= total - 1:
            break
        top = scroll_top + max(1, height - 20)
    ours = [line for line in lines if "ray_eplb." in line]
    epochs: dict[str, list[int]] = {"committed": [], "aborted": []}
    for line in ours:
        m = EPOCH_LINE.search(line)
        if m and int(m.group(1)) not in epochs[m.group(2)]:
            epochs[m.group(2)].append(int(m.group(1)))
    return {"page": page, "lines": ours, "filtered": bool(field), **{k: sorted(v) for k, v in epochs.items()}}
