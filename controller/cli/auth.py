"""Ray token authentication for clusters we start ourselves.

``ray.init()`` turns Ray's token authentication on when it starts a cluster; a cluster built with
``ray.cluster_utils.Cluster`` (the demo's several raylets) does not. :func:`enable_token_auth`
does what ``ray.init()`` does, before the cluster starts: ``RAY_AUTH_MODE=token`` in this process's
environment (every process the cluster starts inherits it) and a token where Ray looks for one:
``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``, generated
there when none exists. An explicit ``RAY_AUTH_MODE`` other than ``token`` is respected, as Ray
does.
"""
from __future__ import annotations

import os
from pathlib import Path


def token_location() -> str:
    """Where this process's Ray reads the token from (an environment variable or a file path)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return os.environ["RAY_AUTH_TOKEN_PATH"]
    return str(Path.home() / ".ray" / "auth_token")


def enable_token_auth() -> str | None:
    """Turn token authentication on for the cluster this process is about to start; returns where
    the token lives, or ``None`` when ``RAY_AUTH_MODE`` explicitly turns it off."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        return None
    from ray._private.authentication.authentication_token_setup import (
        enable_token_auth_by_default,
        ensure_token_if_auth_enabled,
    )

    enable_token_auth_by_default()  # RAY_AUTH_MODE=token here and in every child; Ray's config refreshed
    ensure_token_if_auth_enabled({}, create_token_if_missing=True)  # a token where Ray looks, made if missing
    return token_location()
