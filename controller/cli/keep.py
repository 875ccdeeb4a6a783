"""``ray-eplb demo --keep``: the demo's cluster, workers and controller stay up after the demo, to
look at on the dashboard and steer with the operator commands; what to print so a person can.

The demo then starts its raylets without tying them to its own process (``Cluster(shutdown_at_exit=
False)``) and launches the workers and the controller as detached actors (their placement groups
too), so all of it outlives the demo's driver. ``ray-eplb stop --address ADDRESS`` removes the
balancer; ``ray stop`` ends the cluster (it ends every Ray this user runs on the machine).
"""
from __future__ import annotations

import shlex


def lifetime_for(keep: bool) -> str | None:
    """The workers' and the controller's actor lifetime: ``"detached"`` to keep them. Ray's warning
    that a detached worker dies with its placement group is dropped then: here both go together
    (``ray-eplb stop``), as for ``ray-eplb start``."""
    if not keep:
        return None
    import logging

    from ray_eplb.controller.service import _DropDetachedPlacementWarning

    logging.getLogger("ray.actor").addFilter(_DropDetachedPlacementWarning())
    return "detached"


def announce(summary: dict, address: str, token_where: str | None) -> bool:
    """Put what was kept in the demo's ``summary`` (``kept``) and print how to use it; True."""
    summary["kept"] = kept(address, summary["dashboard"]["url"], token_where)
    print("\n".join(lines(summary["kept"])))
    return True


def kept(address: str, dashboard_url: str | None, token_where: str | None, session_dir: str | None = "") -> dict:
    """What ``--json`` reports about the cluster left running (``session_dir`` ``""``: the session
    folder of the cluster this driver is connected to, where its logs are)."""
    if session_dir == "":
        session_dir = _session_dir()
    url = dashboard_url if not dashboard_url or dashboard_url.startswith("http") else f"http://{dashboard_url}"
    return {"address": address, "dashboard": url, "token": token_where, "session_dir": session_dir,
            "stop": [f"ray-eplb stop --address {address}", "ray stop"]}


def lines(k: dict) -> list[str]:
    """How to look at the cluster the demo left running, log in, steer the balancer, and stop it all."""
    auth = ""
    if k["token"]:
        where = k["token"]
        login = (f"the token in {where}" if where.startswith("$") else
                 f"the token in {where} (`cat {shlex.quote(where)}`, or `ray get-auth-token`)")
        out = [f"[demo] dashboard {k['dashboard'] or '(none)'}: log in with {login}, pasted into the dashboard's "
               "token dialog"]
        auth = "RAY_AUTH_MODE=token "
    else:
        out = [f"[demo] dashboard {k['dashboard'] or '(none)'} (token authentication off: no login)"]
    return [
        f"[demo] kept running: the Ray cluster at {k['address']}, its workers and the controller "
        f"(loop stopped; session {k['session_dir']})",
        *out,
        f"[demo] steer it from any shell: {auth}ray-eplb status --address {k['address']}  "
        "(also rebalance, history --plot h.png, config set key=value)",
        f"[demo] stop it: {auth}{k['stop'][0]} (the balancer), then `{k['stop'][1]}` (the cluster; it stops every "
        "Ray this user runs on this machine)",
    ]


def _session_dir() -> str | None:
    import ray

    try:
        return ray._private.worker._global_node.get_session_dir_path()
    except AttributeError:  # private API: the folder is a courtesy in the notice
        return None
