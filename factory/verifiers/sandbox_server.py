"""The sandbox server: forks one isolated child per job, enforces limits and timeouts, checks the proof.

Started by :class:`factory.verifiers.sandbox.Sandbox` as ``python -I -m factory.verifiers.sandbox_server N``;
the protocol is length-prefixed pickles on its stdin/stdout (``HEADER``). Single-threaded: one
``selectors`` loop watches the request pipe, every job's stdout/stderr/proof pipes and a pidfd per job.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import pickle
import resource
import selectors
import signal
import struct
import sys
import time

from factory.verifiers import isolation

# Length prefix of each pickled message between caller and server. The server imports as little as it
# can: every page of its heap is copied (page tables at fork, the page itself when written) per job.
HEADER = struct.Struct("!I")


def _set_limits(limits: dict) -> None:
    cpu = math.ceil(limits["timeout"]) + 1
    memory = limits["memory_mb"] * 1024 * 1024
    fsize = limits["max_file_mb"] * 1024 * 1024
    for which, soft, hard in (
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, memory, memory),
        (resource.RLIMIT_NPROC, limits["max_processes"], limits["max_processes"]),
        (resource.RLIMIT_FSIZE, fsize, fsize),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(which, (soft, hard))


def _child(job: dict, fds: dict, nonce: bytes, support: dict) -> None:
    """Runs in the forked child (PID 1 of its own PID namespace, when granted); never returns."""
    try:
        os.setsid()
        isolation.enter_job_namespaces(fds["workdir"], support)
        _set_limits(job["limits"])
        isolation.drop_privileges(support)
        os.chdir(fds["workdir"])
        os.environ.clear()
        os.environ.update(
            {"PATH": "/usr/bin:/bin", "HOME": fds["workdir"], "TMPDIR": fds["workdir"], "LANG": "C.UTF-8"}
        )
        for target, fd in ((0, fds["stdin"]), (1, fds["stdout"]), (2, fds["stderr"])):
            os.dup2(fd, target)
        proof = os.dup2(fds["proof"], 3 + os.urandom(1)[0] % 200)  # a random descriptor number
        os.closerange(3, proof)
        os.closerange(proof + 1, 2**31 - 1)  # close_range(2): every descriptor above
        sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False, buffering=1)  # noqa: SIM115
        from factory.verifiers import harness

        harness.run(job["payload"], proof_fd=proof, nonce=nonce)
    except BaseException:  # noqa: BLE001 - nothing may escape a forked child
        with contextlib.suppress(BaseException):
            os.write(2, b"sandbox child setup failed\n")
    os._exit(70)


class _Running:
    """One job in flight. ``status`` is set when the server killed it (timeout / output_limit)."""

    __slots__ = (
        "index",
        "pid",
        "pidfd",
        "nonce",
        "workdir",
        "limits",
        "start",
        "streams",
        "data",
        "total_output",
        "status",
        "exited",
    )

    def __init__(self, index, pid, pidfd, nonce, workdir, limits, start) -> None:
        self.index, self.pid, self.pidfd, self.nonce = index, pid, pidfd, nonce
        self.workdir, self.limits, self.start = workdir, limits, start
        self.streams: dict = {}  # fd -> name ("stdout", "stderr", "proof")
        self.data = {"stdout": bytearray(), "stderr": bytearray(), "proof": bytearray()}
        self.total_output = 0
        self.status: str | None = None
        self.exited = False


class _Server:
    def __init__(self, workers: int, proto_in: int, proto_out: int, *, base: str, server_ns: dict) -> None:
        self.workers, self.proto_in, self.proto_out = workers, proto_in, proto_out
        self.selector = selectors.DefaultSelector()
        self.queue: list = []
        self.running: dict[int, _Running] = {}  # by pid
        self.buffer = bytearray()
        self.closing = False
        self.base = base
        self.workdir = os.path.join(self.base, "work")
        os.mkdir(self.workdir)
        self.pid_namespace = isolation.own_pid_namespace() if server_ns["pid"] else None
        self.support = isolation.probe_isolation(
            self.workdir, server=server_ns, pid_namespace=self.pid_namespace
        )

    def send(self, message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(HEADER.pack(len(data)) + data)
        while view:
            view = view[os.write(self.proto_out, view) :]

    def loop(self) -> None:
        self.send(("hello", self.support))
        os.set_blocking(self.proto_in, False)
        self.selector.register(self.proto_in, selectors.EVENT_READ, None)
        while not (self.closing and not self.running and not self.queue):
            while self.queue and len(self.running) < self.workers:
                self.launch(*self.queue.pop(0))
            now = time.monotonic()
            wait = None
            if self.running:
                wait = max(0.0, min(r.start + r.limits["timeout"] for r in self.running.values()) - now)
            for key, _ in self.selector.select(wait):
                if key.data is None:
                    self.read_requests()
                else:
                    self.read_stream(*key.data)
            now = time.monotonic()
            for run in list(self.running.values()):
                if not run.exited and run.status is None and now - run.start > run.limits["timeout"]:
                    self.kill(run, "timeout")
                if run.exited:
                    self.finish(run)

    def read_requests(self) -> None:
        try:
            chunk = os.read(self.proto_in, 1 << 20)
        except BlockingIOError:
            return
        if not chunk:
            self.selector.unregister(self.proto_in)
            self.closing = True
            self.queue.clear()  # the caller went away: nobody wants these results
            return
        self.buffer += chunk
        while len(self.buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buffer)
            if len(self.buffer) < HEADER.size + size:
                break
            index, payload, limits = pickle.loads(self.buffer[HEADER.size : HEADER.size + size])
            del self.buffer[: HEADER.size + size]
            self.queue.append((index, payload, limits))

    def launch(self, index: int, payload: dict, limits: dict) -> None:
        # With mount namespaces every job gets a fresh tmpfs at the same path; else a directory per job.
        shared = self.support["readonly_mounts"]
        workdir = self.workdir if shared else _make_dir(self.base)
        stdin = os.memfd_create("stdin", os.MFD_CLOEXEC)  # the job's input, never on a file system
        data = memoryview(str(payload.get("stdin") or "").encode("utf-8"))
        while data:
            data = data[os.write(stdin, data) :]
        os.lseek(stdin, 0, os.SEEK_SET)
        pipes = {name: os.pipe() for name in ("stdout", "stderr", "proof")}
        nonce = os.urandom(16).hex().encode()
        fds = {"workdir": workdir, "stdin": stdin, **{n: w for n, (_, w) in pipes.items()}}
        pid = isolation.fork_job(self.support, self.pid_namespace)
        if pid == 0:
            _child({"payload": payload, "limits": limits}, fds, nonce, self.support)
        os.close(stdin)
        run = _Running(index, pid, os.pidfd_open(pid), nonce, workdir, limits, time.monotonic())
        for name, (read_end, write_end) in pipes.items():
            os.close(write_end)
            os.set_blocking(read_end, False)
            run.streams[read_end] = name
            self.selector.register(read_end, selectors.EVENT_READ, (run, read_end))
        self.selector.register(run.pidfd, selectors.EVENT_READ, (run, run.pidfd))
        self.running[pid] = run

    def read_stream(self, run: _Running, fd: int) -> None:
        if fd == run.pidfd:
            run.exited = True
            return
        name = run.streams[fd]
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                self.selector.unregister(fd)
                os.close(fd)
                del run.streams[fd]
                return
            if name == "proof":
                if len(run.data["proof"]) < 16 * 1024 * 1024:
                    run.data["proof"] += chunk
                continue
            room = run.limits["capture_bytes"] - len(run.data[name])
            if room > 0:
                run.data[name] += chunk[:room]
            run.total_output += len(chunk)
            if run.total_output > run.limits["max_output_bytes"] and run.status is None:
                self.kill(run, "output_limit")
                return

    def kill(self, run: _Running, status: str) -> None:
        run.status = status
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, signal.SIGKILL)

    def finish(self, run: _Running) -> None:
        # Kill stragglers of the group (without a PID namespace they would outlive the job), then read
        # what is left in the pipes without waiting for EOF: an escaped process may hold them open.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, signal.SIGKILL)
        _, status = os.waitpid(run.pid, 0)
        for fd in list(run.streams):
            self.read_stream(run, fd)
            if fd in run.streams:
                self.selector.unregister(fd)
                os.close(fd)
        self.selector.unregister(run.pidfd)
        os.close(run.pidfd)
        del self.running[run.pid]
        if run.workdir != self.workdir:
            _remove_tree(run.workdir)
        seconds = time.monotonic() - run.start
        outcome = {
            "status": run.status or "no_proof",
            "stdout": run.data["stdout"].decode("utf-8", "replace"),
            "stderr": run.data["stderr"].decode("utf-8", "replace"),
            "exit_code": os.waitstatus_to_exitcode(status),
            "seconds": round(seconds, 4),
        }
        proof = bytes(run.data["proof"])
        if run.status is None and proof.startswith(run.nonce):
            try:
                outcome["report"] = _loads_json(proof[len(run.nonce) :])
                outcome["status"] = "finished"
            except ValueError:
                outcome["detail"] = "malformed proof"
        elif run.status is None:
            outcome["detail"] = "ended without the harness's proof" + (" (bad nonce)" if proof else "")
        self.send((run.index, outcome))


def _loads_json(data: bytes) -> dict:
    import json

    report = json.loads(data.decode("utf-8"))
    if not isinstance(report, dict):
        raise ValueError("proof is not an object")
    return report


def _make_dir(parent: str, prefix: str = "job-") -> str:
    """A new private directory (``tempfile.mkdtemp`` without importing ``tempfile`` into the server)."""
    while True:
        path = os.path.join(parent, prefix + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def _remove_tree(path: str) -> None:
    import shutil  # only here: the forking server stays small

    shutil.rmtree(path, onerror=_force_remove)


def _force_remove(function, path, _excinfo) -> None:
    # A job may leave read-only files or directories behind; make them writable and try again.
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        function(path)


def serve(workers: int) -> None:
    """The server's main: protocol on the original stdin/stdout, which are then pointed at /dev/null."""
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    from factory.verifiers import harness

    harness.preload()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    base = _make_dir(os.getcwd(), "restem-sandbox-")  # the caller starts us in its temporary directory
    server_ns = isolation.enter_server_namespaces()
    if server_ns["pid"]:
        isolation.become_pid1()  # from here on: the server proper, PID 1 of its own PID namespace
    # Keep the server's objects out of the children's garbage collections: a collection walks every
    # object, which would copy the whole inherited heap page by page in each forked child.
    gc.collect()
    gc.freeze()
    try:
        server = _Server(workers, proto_in, proto_out, base=base, server_ns=server_ns)
        server.loop()
    except BrokenPipeError:
        pass  # the caller went away (as PID 1 the server is immune to its own SIGPIPE): nothing to report to
    finally:
        _remove_tree(base)


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
