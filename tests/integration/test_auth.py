"""Token authentication on the demo's kind of cluster (``ray.cluster_utils.Cluster``, two raylets):
the dashboard API and the GCS refuse clients without the token (fresh process, own HOME)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.timeout(200)
def test_the_demo_cluster_refuses_clients_without_the_token(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # the product path: no opt-out
    out = subprocess.run([sys.executable, str(HERE / "auth_script.py")], capture_output=True, text=True, timeout=190,
                         env={**env, "HOME": str(home)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    token_file = home / ".ray" / "auth_token"
    assert got["token_file"] == str(token_file) and len(token_file.read_text().strip()) >= 32  # made where Ray looks
    assert got["env_mode"] == "token" and got["nodes"] == 2
    assert got["http"] == {"with_token": 200, "without": 401, "wrong_token": 403}
    d = got["drivers"]
    assert d["with_token"]["connected"] and d["with_token"]["rc"] == 0
    for case in ("without_token", "without_token_auth_mode_token", "wrong_token"):
        assert not d[case]["connected"] and d[case]["rc"] != 0, (case, d[case])
    assert "AuthenticationError" in d["without_token_auth_mode_token"]["err"]
