"""The sandbox's isolation set-up: the probe's fallbacks, and a server whose kernel grants no namespaces.

The exploit suite (test_sandbox_exploits.py) runs with whatever this kernel grants (here: everything);
these tests drive the degraded paths directly, since no kernel here refuses them.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from dataclasses import asdict

from conftest import processes_with

from factory.verifiers import isolation
from factory.verifiers.sandbox import Limits, recv
from factory.verifiers.sandbox_server import HEADER, _Server


def test_probe_without_server_namespaces_keeps_what_jobs_can_get(tmp_path):
    # A server with no PID namespace of its own: jobs are plain forks, without a /proc of their own.
    server = {"user": True, "network": True, "pid": False}
    support = isolation.probe_isolation(str(tmp_path), server=server, pid_namespace=None)
    assert support["pid"] is False and support["proc"] is False
    assert support["network"] is True and support["own_network"] is False
    assert support["user"] is True and support["readonly_mounts"] is True  # granted on this kernel
    assert support["ipc"] is True and support["seccomp"] is True
    assert support["reason"] == "not granted: pid, proc"


def _serve_in_child(server_ns: dict, base: str) -> tuple[int, int, int]:
    """A sandbox server (in a forked child of the test) that was granted only ``server_ns``."""
    requests_r, requests_w = os.pipe()
    results_r, results_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(requests_w)
            os.close(results_r)
            _Server(2, requests_r, results_w, base=base, server_ns=server_ns).loop()
        finally:
            os._exit(0)
    os.close(requests_r)
    os.close(results_w)
    return pid, requests_w, results_r


def test_server_without_namespaces_still_judges_and_cleans_up(tmp_path):
    marker = f"{os.getpid()}.{time.monotonic_ns() % 100000}"  # this run's own background process
    jobs = [
        {"mode": "function", "program": "def f(x):\n    return x + 1\n", "tests": ["assert f(1) == 2"]},
        {"mode": "function", "program": "def f(x):\n    return x\n", "tests": ["assert f(1) == 2"]},
        {  # a background process in a session of its own, then a clean finish
            "mode": "function",
            "program": f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n",
            "tests": [],
        },
        {"mode": "function", "program": "import os\nos._exit(0)\n", "tests": ["assert True"]},
        {"mode": "function", "program": "while True:\n    pass\n", "tests": []},
    ]
    base = str(tmp_path / "base")
    os.mkdir(base)
    pid, requests, results = _serve_in_child({"user": False, "network": False, "pid": False}, base)
    with os.fdopen(requests, "wb") as out, os.fdopen(results, "rb") as inp:
        hello = None
        for index, payload in enumerate(jobs):
            data = pickle.dumps((index, payload, asdict(Limits(timeout=1.0))))
            out.write(HEADER.pack(len(data)) + data)
        out.flush()
        outcomes = {}
        while len(outcomes) < len(jobs):
            message = recv(inp)
            assert message is not None, "the server died"
            if message[0] == "hello":
                hello = message[1]
                continue
            outcomes[message[0]] = message[1]
    os.waitpid(pid, 0)
    assert hello["pid"] is False and hello["proc"] is False  # what the server was given
    assert hello["readonly_mounts"] is True  # what its jobs could still get on this kernel
    assert outcomes[0]["status"] == "finished" and outcomes[0]["report"]["tests"][0]["passed"]
    assert outcomes[1]["status"] == "finished" and not outcomes[1]["report"]["tests"][0]["passed"]
    assert outcomes[2]["status"] == "finished"
    assert outcomes[3]["status"] == "no_proof"  # exited before the tests: no proof
    assert outcomes[4]["status"] == "timeout"
    # Without a PID namespace the server can only kill the job's process group, and a process that
    # started a session of its own is not in it: the limit docs/code_verifier.md states for this fallback.
    escaped = processes_with(marker)
    for pid in escaped:
        os.kill(pid, signal.SIGKILL)
    assert len(escaped) == 1
    assert os.listdir(base) == ["work"]  # the jobs' tmpfs work directories left nothing behind


def test_old_kernel_read_only_remounts_hold(tmp_path, monkeypatch):
    """Kernels before 5.12 (no mount_setattr): every visible mount is remounted read-only one by one,
    and the result is checked; forced here in a job child of the test."""
    monkeypatch.setattr(isolation, "_readonly_tree", lambda libc: False)
    outside = tmp_path / "outside.txt"
    workdir = tmp_path / "work"
    workdir.mkdir()
    support = {"user": True, "network": True, "own_network": False, "pid": False, "readonly_mounts": True}
    support.update(proc=False, ipc=True, seccomp=True)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            isolation.enter_job_namespaces(str(workdir), support)
            isolation.drop_privileges(support)
            results = []
            for path in (outside, workdir / "inside.txt"):
                try:
                    path.write_text("x")
                    results.append("wrote")
                except OSError as error:
                    results.append(error.strerror)
            os.write(write, "|".join(results).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as handle:
        assert handle.read() == "Read-only file system|wrote"
    assert not outside.exists()
