"""Run untrusted Python programs in isolated, resource-limited child processes.

Layout: the calling process starts one small **server** (``python -I -m factory.verifiers.sandbox``,
single-threaded, scrubbed environment, the harness and common stdlib modules imported once) and sends it
jobs over a pipe. For every job the server forks a fresh child, so a job costs a ``fork`` instead of a new
interpreter (what makes ``multiprocessing`` spawn-based executors slow), and runs up to ``workers`` of them
at once. Each child:

* starts a new session (``setsid``), so the whole job is one process group the server can ``killpg``;
* where the kernel allows it, enters new user, mount and PID namespaces (and shares the server's network
  namespace): no network (only a down loopback), every mount read-only except the job's work directory,
  and the job runs as PID 1 of its own namespace, so it cannot see or signal the server, the caller or any
  other process, and everything it started dies with it;
* forks the job process, which sets resource limits (CPU seconds, address space, processes, file size, no
  core files), changes into its work directory (a tmpfs of its own where mount namespaces are granted,
  else a fresh directory removed afterwards), clears the environment, gets stdin from the job's input and
  stdout/stderr on capped pipes, and runs ``harness.run``.

The server enforces the wall-clock timeout by killing the process group, kills a job whose output passes
``Limits.max_output_bytes`` (it keeps the first ``Limits.capture_bytes`` of each stream), and accepts the
harness's report only when it carries the job's random nonce on the private proof pipe. Which isolation the
kernel granted is probed once per server (:func:`probe_isolation`, :meth:`Sandbox.isolation`) and logged
once per process when something is missing. Design notes and known gaps: docs/code_verifier.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import math
import os
import pickle
import resource
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1,
    2,
    4,
    32,
    4096,
    16384,
    1 << 18,
)
# mount_setattr(2) (x86_64 and aarch64 share the number), AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY.
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 0x1
_TMPFS_MB = 64  # the job's working directory (with mount namespaces); files are capped by RLIMIT_FSIZE too
# statvfs flag bits that a read-only bind remount must repeat (the kernel refuses to drop them).
_KEEP_FLAGS = {2: 2, 4: 4, 8: 8, 1024: 1024, 2048: 2048, 4096: 1 << 21}  # nosuid nodev noexec noatime ...
_HEADER = struct.Struct("!I")
_warned: set[str] = set()


@dataclass(frozen=True)
class Limits:
    """Resource limits of one job.

    Attributes:
        timeout: Wall-clock seconds before the job's process group is killed.
        memory_mb: Address-space limit (``RLIMIT_AS``).
        max_processes: Processes the job may have (``RLIMIT_NPROC``; counted per user namespace).
        max_file_mb: Largest file the job may write (``RLIMIT_FSIZE``).
        capture_bytes: Bytes of stdout and of stderr kept in the result.
        max_output_bytes: stdout + stderr bytes after which the job is killed (status ``output_limit``).
    """

    timeout: float = 5.0
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16
    capture_bytes: int = 65536
    max_output_bytes: int = 8 * 1024 * 1024


@dataclass
class JobResult:
    """What happened to one job.

    ``status`` is ``finished`` (the harness proved it ran to the end; see ``report``), ``no_proof`` (the
    process ended without a valid proof: it exited early, crashed or was killed by a limit), ``timeout``,
    ``output_limit`` or ``error`` (the sandbox itself failed).
    """

    status: str
    report: dict | None = None
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    seconds: float = 0.0
    detail: str = ""
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- client


class Sandbox:
    """Client of one sandbox server; use as a context manager (``with Sandbox() as box: box.run(jobs)``).

    Args:
        workers: Jobs that run at the same time.
        limits: Default limits of every job.
    """

    def __init__(self, *, workers: int = 2, limits: Limits | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.limits = workers, limits or Limits()
        self._proc: subprocess.Popen | None = None
        self.support: dict = {}
        self.restarts = 0

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start(self) -> None:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "factory.verifiers.sandbox", str(self.workers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=tempfile.gettempdir(),
            close_fds=True,
            start_new_session=True,  # a job cannot signal the caller's process group through the server's
        )
        hello = _recv(self._proc.stdout)
        if not hello or hello[0] != "hello":
            raise RuntimeError("the sandbox server did not start (see stderr)")
        self.support = hello[1]
        _warn_once(self.support)

    def isolation(self) -> dict:
        """What the kernel granted (``user``, ``network``, ``pid``, ``readonly_mounts``, ``proc``); starts
        the server if needed."""
        if self._proc is None:
            self._start()
        return self.support

    def close(self) -> None:
        """Stop the server (running jobs are killed)."""
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._proc = None

    def run(self, payloads: list[dict], *, limits: Limits | None = None) -> list[JobResult]:
        """Run harness payloads (see ``harness.py``); results in input order.

        A job in flight when the server dies (only possible without a PID namespace) is run again once;
        a second loss gives status ``error``.
        """
        limits = limits or self.limits
        results: list[JobResult | None] = [None] * len(payloads)
        attempts = [0] * len(payloads)
        todo = list(range(len(payloads)))
        while todo:
            if self._proc is None:
                self._start()
            proc = self._proc
            jobs = [(i, payloads[i], asdict(limits)) for i in todo]
            writer = threading.Thread(target=_send_all, args=(proc.stdin, jobs), daemon=True)
            writer.start()
            pending = set(todo)
            while pending:
                message = _recv(proc.stdout)
                if message is None:  # the server died: restart it and retry what it held
                    break
                index, outcome = message
                results[index] = JobResult(**outcome)
                pending.discard(index)
            writer.join()
            if pending:
                self.close()
                self.restarts += 1
                for i in pending:
                    attempts[i] += 1
                    if attempts[i] >= 2:
                        results[i] = JobResult(
                            "error", detail="the sandbox server died twice during this job"
                        )
                todo = sorted(i for i in pending if results[i] is None)
            else:
                todo = []
        return results  # type: ignore[return-value]


def _send_all(stream, jobs: list) -> None:
    with contextlib.suppress(BrokenPipeError, OSError, ValueError):
        for job in jobs:
            data = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
            stream.write(_HEADER.pack(len(data)) + data)
        stream.flush()


def _recv(stream):
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    return pickle.loads(data) if len(data) == size else None


def _warn_once(support: dict) -> None:
    missing = [n for n in ("user", "network", "pid", "readonly_mounts", "proc") if not support.get(n)]
    key = ",".join(missing)
    if missing and key not in _warned:
        _warned.add(key)
        log.warning(
            "code sandbox: the kernel refused %s isolation (%s); jobs still run in their own process "
            "group with resource limits, scrubbed environment and a temporary directory, but %s",
            "/".join(missing),
            support.get("reason", ""),
            "can reach the network" if "network" in missing else "may affect the host more than usual",
        )


# ----------------------------------------------------------------------------------------------- server


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _enter_namespaces(workdir: str, support: dict) -> None:
    """In a fresh child: new namespaces as granted by the probe; mounts read-only except ``workdir``."""
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    own_network = support["network"] and not support.get("shared_network")
    flags = _CLONE_NEWNET * own_network | _CLONE_NEWPID * support["pid"]
    flags |= _CLONE_NEWNS * support["readonly_mounts"] | _CLONE_NEWUSER * support["user"]
    if not flags:
        return
    _check(libc.unshare(flags), "unshare")
    if support["user"]:
        _write_id_maps(uid, gid)
    if support["readonly_mounts"]:
        if not _readonly_tree(libc):
            _readonly_each_mount(libc)
        # The job's only writable place: a small tmpfs of its own over the (empty) work directory. It
        # vanishes with the job's mount namespace, so nothing is left on the host and nothing is removed.
        options = f"size={_TMPFS_MB}m,mode=0700".encode()
        _check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options), "tmpfs")


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _readonly_tree(libc) -> bool:
    """Every mount read-only and private in one ``mount_setattr`` call (Linux 5.12+); False if refused."""
    attr = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY, propagation=_MS_PRIVATE)
    result = libc.syscall(
        _SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    return result == 0


def _readonly_each_mount(libc) -> None:
    """Older kernels: private propagation, then a read-only bind remount of each mount point."""
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount private")
    with open("/proc/self/mountinfo") as handle:
        points = [line.split()[4].replace("\\040", " ") for line in handle]
    for point in reversed(points):
        try:
            kept = sum(ms for bit, ms in _KEEP_FLAGS.items() if os.statvfs(point).f_flag & bit)
        except OSError:
            continue
        libc.mount(None, point.encode(), None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | kept, None)


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
    """Runs in the forked child; never returns."""
    try:
        os.setsid()
        _enter_namespaces(fds["workdir"], support)
        pid = os.fork()  # PID 1 of the new PID namespace (when granted)
        if pid:
            for fd in (fds["stdin"], fds["stdout"], fds["stderr"], fds["proof"]):
                os.close(fd)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)
        if support.get("proc"):
            _mount_proc(support)
        limits = job["limits"]
        _set_limits(limits)
        os.chdir(fds["workdir"])
        os.environ.clear()
        os.environ.update(
            {"PATH": "/usr/bin:/bin", "HOME": fds["workdir"], "TMPDIR": fds["workdir"], "LANG": "C.UTF-8"}
        )
        for target, fd in ((0, fds["stdin"]), (1, fds["stdout"]), (2, fds["stderr"])):
            os.dup2(fd, target)
        proof = os.dup2(fds["proof"], 3 + secrets.randbelow(200))  # a random descriptor number
        os.closerange(3, proof)
        os.closerange(proof + 1, 65536)
        sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False, buffering=1)  # noqa: SIM115
        from factory.verifiers import harness

        harness.run(job["payload"], proof_fd=proof, nonce=nonce)
    except BaseException:  # noqa: BLE001 - nothing may escape a forked child
        with contextlib.suppress(BaseException):
            os.write(2, b"sandbox child setup failed\n")
    os._exit(70)


@dataclass
class _Running:
    index: int
    pid: int
    pidfd: int
    nonce: bytes
    workdir: str
    limits: dict
    start: float
    streams: dict  # fd -> name ("stdout", "stderr", "proof")
    data: dict = field(
        default_factory=lambda: {"stdout": bytearray(), "stderr": bytearray(), "proof": bytearray()}
    )
    total_output: int = 0
    status: str | None = None  # set when the server killed it (timeout / output_limit)
    exited: bool = False


class _Server:
    def __init__(self, workers: int, proto_in: int, proto_out: int, *, shared_network: bool) -> None:
        self.workers, self.proto_in, self.proto_out = workers, proto_in, proto_out
        self.selector = selectors.DefaultSelector()
        self.queue: list = []
        self.running: dict[int, _Running] = {}  # by pid
        self.buffer = bytearray()
        self.closing = False
        self.support = probe_isolation(shared_network=shared_network)
        self.base = tempfile.mkdtemp(prefix="restem-sandbox-")
        self.workdir = os.path.join(self.base, "work")
        os.mkdir(self.workdir)

    def send(self, message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(_HEADER.pack(len(data)) + data)
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
        while len(self.buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buffer)
            if len(self.buffer) < _HEADER.size + size:
                break
            index, payload, limits = pickle.loads(self.buffer[_HEADER.size : _HEADER.size + size])
            del self.buffer[: _HEADER.size + size]
            self.queue.append((index, payload, limits))

    def launch(self, index: int, payload: dict, limits: dict) -> None:
        # With mount namespaces every job gets a fresh tmpfs at the same path; else a directory per job.
        shared = self.support["readonly_mounts"]
        workdir = self.workdir if shared else tempfile.mkdtemp(dir=self.base)
        stdin = os.memfd_create("stdin", os.MFD_CLOEXEC)  # the job's input, never on a file system
        data = memoryview(str(payload.get("stdin") or "").encode("utf-8"))
        while data:
            data = data[os.write(stdin, data) :]
        os.lseek(stdin, 0, os.SEEK_SET)
        pipes = {name: os.pipe() for name in ("stdout", "stderr", "proof")}
        nonce = secrets.token_hex(16).encode()
        fds = {"workdir": workdir, "stdin": stdin, **{n: w for n, (_, w) in pipes.items()}}
        pid = os.fork()
        if pid == 0:
            _child({"payload": payload, "limits": limits}, fds, nonce, self.support)
        os.close(stdin)
        run = _Running(index, pid, os.pidfd_open(pid), nonce, workdir, limits, time.monotonic(), streams={})
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
            shutil.rmtree(run.workdir, onerror=_force_remove)
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


def _force_remove(function, path, _excinfo) -> None:
    # A job may leave read-only files or directories behind; make them writable and try again.
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        function(path)


def _write_id_maps(uid: int, gid: int) -> None:
    """Map our own uid/gid into the user namespace just entered (ids read before entering it)."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)


def enter_shared_network() -> bool:
    """Move the server into a network namespace of its own (only a down loopback), inherited by every job.

    A fresh network namespace per job costs more than the rest of the isolation together (the kernel
    tears each one down in the background), so jobs share the server's: it has no interfaces, and jobs,
    in nested user namespaces, lack the capability to configure it. Concurrent jobs could still reach
    each other through abstract Unix sockets, which gains a sample nothing against its own tests.
    """
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        _write_id_maps(uid, gid)
        return True
    return libc.unshare(_CLONE_NEWNET) == 0  # root where user namespaces are off


def probe_isolation(*, shared_network: bool = False) -> dict:
    """Which namespaces this kernel grants an unprivileged fork of this process (tried in a child)."""
    support = {
        "user": True,
        "network": True,
        "pid": True,
        "readonly_mounts": True,
        "shared_network": shared_network,
        "reason": "",
    }
    attempts = [support, {**support, "user": False}]  # root in a container may not get user namespaces
    workdir = tempfile.mkdtemp(prefix="restem-probe-")
    try:
        for attempt in attempts:
            pid = os.fork()
            if pid == 0:
                try:
                    _enter_namespaces(workdir, attempt)
                    inner = os.fork()
                    if inner == 0:
                        os._exit(0 if _mount_proc(attempt) else 1)
                    _, inner_status = os.waitpid(inner, 0)
                    os._exit(0 if os.waitstatus_to_exitcode(inner_status) == 0 else 2)
                except BaseException:  # noqa: BLE001
                    os._exit(1)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            if code in (0, 2):
                return {**attempt, "proc": code == 0}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "user": False,
        "network": shared_network,
        "shared_network": shared_network,
        "pid": False,
        "readonly_mounts": False,
        "proc": False,
        "reason": "unshare() not permitted",
    }


def _mount_proc(support: dict) -> bool:
    """As PID 1 of a new PID namespace: a /proc of its own, so no other process (or its environment,
    ``/proc/PID/environ``) is visible. False when not granted."""
    if not (support["pid"] and support["readonly_mounts"]):
        return False
    return _libc().mount(b"proc", b"/proc", b"proc", 2 | 4 | 8, None) == 0  # nosuid nodev noexec


def serve(workers: int) -> None:
    """The server's main: protocol on the original stdin/stdout, which are then pointed at /dev/null."""
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    from factory.verifiers import harness

    harness.preload()
    # Keep the server's objects out of the children's garbage collections: a collection walks every
    # object, which would copy the whole inherited heap page by page in each forked child.
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    shared_network = enter_shared_network()
    server = _Server(workers, proto_in, proto_out, shared_network=shared_network)
    try:
        server.loop()
    finally:
        shutil.rmtree(server.base, onerror=_force_remove)


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
