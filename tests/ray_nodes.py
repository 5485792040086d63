"""Ray nodes on this machine for tests and benchmarks: `ray start --block` per node, each stopped by the ids of
the processes it started (`ray stop` would end every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env() -> dict:
    """The environment of the nodes and of a driver joining them: lmforge importable; the token the head makes
    presented by the second node and the driver."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "RAY_AUTH_MODE": "token"}


def start_node(port: int, head: bool) -> subprocess.Popen:
    """A node of one CPU (the head, listening on `port`, or one joining it), in a process group of its own,
    returned once it says it runs."""
    where = ["--head", f"--port={port}", "--include-dashboard=false"] if head else [f"--address=127.0.0.1:{port}"]
    command = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--num-cpus=1", *where]
    node = subprocess.Popen(command, env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in node.stdout:
        if "Ray runtime started" in line:
            return node
    raise AssertionError(f"{' '.join(command)}: the node did not start")


def stop_nodes(nodes: list[subprocess.Popen]) -> None:
    """Every process the nodes started, by id (`ray stop` would end every Ray on the machine)."""
    started = [psutil.Process(n.pid) for n in nodes]
    started += [c for n in started for c in n.children(recursive=True)]
    for proc in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(started, timeout=30)
    # `ray start --head` names its cluster there for a later `ray.init()`; `ray stop` would remove it.
    with contextlib.suppress(FileNotFoundError):
        (Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster").unlink()
