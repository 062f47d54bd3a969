"""Every Ray klstore or its tests start on this machine listens on loopback only (issue 21
item 6): its listening sockets, read from /proc, are all on 127.0.0.1 (or ::1)."""

import json
import os
import subprocess
import sys

from conftest import REPO
from netcheck import is_loopback, listening, process_tree

LOCAL_RAY = r"""
import json, os, sys
sys.path.insert(0, "tests")
from klstore.run import runner
from netcheck import listening, process_tree
ray, started = runner.init_ray(1)
node_ip = ray.util.get_node_ip_address()
sockets = listening(process_tree(os.getpid()))
ray.shutdown()
print("RESULT " + json.dumps({"started": started, "node_ip": node_ip, "sockets": sockets}))
"""


def _assert_loopback(sockets, what):
    assert len(sockets) >= 3, f"{what}: expected the GCS, raylet and agents listening, saw {sockets}"
    outside = [s for s in sockets if not is_loopback(s[1])]
    assert not outside, f"{what} listens beyond loopback: {outside}"


def test_klstore_local_ray_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    out = subprocess.run(
        [sys.executable, "-c", LOCAL_RAY], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(line[len("RESULT ") :])
    assert result["started"] and result["node_ip"] == "127.0.0.1"
    _assert_loopback(result["sockets"], "klstore's local Ray")


def test_ray_imported_first_with_multinode_on_is_one_line():
    code = (
        "import ray, sys; from klstore.run import runner; from klstore.errors import KlstoreError\n"
        "try:\n    runner.init_ray(1)\nexcept KlstoreError as exc:\n    print('ERR', exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "ERR ray was imported before klstore started its local Ray" in out.stdout, out.stdout + out.stderr


def test_the_tests_shared_ray_listens_on_loopback_only(ray_session):
    ray = ray_session
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    _assert_loopback(listening(process_tree(os.getpid())), "the tests' shared Ray")
