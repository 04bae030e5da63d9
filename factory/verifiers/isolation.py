"""Kernel isolation for sandbox jobs: user, network, mount and PID namespaces (Linux), probed, not assumed.

Python 3.11 has no ``os.unshare``/``os.setns``, so ``unshare``, ``setns``, ``mount``, ``mount_setattr``,
``capset`` and ``prctl`` are called through ctypes. Everything here runs in the sandbox server or in a
freshly forked job child (see ``sandbox_server.py``); nothing touches the caller's process.

Layout, when the kernel grants it::

    server wrapper        user namespace U, empty network namespace, IPC namespace; waits for the server
      server (PID 1 of P0, owned by U)
        job (PID 1 of its own P1)   own mount namespace: every mount read-only, nosuid, nodev (but
                                    /dev/null, zero, random, urandom), a tmpfs work dir, a read-only
                                    /proc of its own; then no capabilities and no_new_privs

One ``fork`` per job: the server ``unshare(CLONE_NEWPID)``s just before forking, so the child is born as
PID 1 of a fresh PID namespace, then ``setns`` back to P0 (allowed because the server holds
``CAP_SYS_ADMIN`` in U, which owns P0). When a job's PID 1 exits, the kernel kills everything it left in
its namespace.

Jobs run as the server's user (root, where the caller is root): without capabilities, on read-only,
``nodev`` mounts and with a read-only ``/proc``, that user can change nothing outside the job's tmpfs, not
even through the files only root may write (``/proc/sys``, ``/proc/sysrq-trigger``, block devices).
"""

from __future__ import annotations

import ctypes
import os
import signal

from factory.verifiers import seccomp

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER = 0x20000, 0x8000000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
# mount_setattr(2) (x86_64 and aarch64 share the number), AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_* flags.
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE = 442, -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
# Device nodes a program may legitimately open; every other device is unusable in a job (nodev).
HARMLESS_DEVICES = (b"/dev/null", b"/dev/zero", b"/dev/random", b"/dev/urandom")
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
_KEYCTL_JOIN_SESSION_KEYRING = 1
_CAPABILITY_VERSION_3 = 0x20080522
SHM_MB = 16  # the job's own /dev/shm (with mount namespaces)
TMPFS_MB = 64  # the job's working directory (with mount namespaces); files are capped by RLIMIT_FSIZE too
# statvfs flag bits that a read-only bind remount must repeat (the kernel refuses to drop them).
_KEEP_FLAGS = {2: 2, 4: 4, 8: 8, 1024: 1024, 2048: 2048, 4096: 1 << 21}  # nosuid nodev noexec noatime ...
_libc_handle = None


def _libc():
    """libc through ctypes, loaded once, with every function a job child calls already looked up.

    The server calls this before forking, so jobs inherit the resolved functions: a lookup (``dlsym``
    plus a new function object) in each child would cost it again, per job.
    """
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(None, use_errno=True)
        for name in ("unshare", "setns", "mount", "syscall", "prctl", "capset"):
            getattr(_libc_handle, name)
    return _libc_handle


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


# ------------------------------------------------------------------------------------------------ server


def enter_server_namespaces() -> dict:
    """Move the server into a user namespace, an empty network namespace and an IPC namespace, and make
    its next child PID 1 of a new PID namespace. Returns ``{"user": bool, "network": bool, "pid": bool}``: what was granted.

    A fresh network namespace per job costs more than the rest of the isolation together (the kernel
    tears each one down in the background), so jobs share the server's: it has no interfaces but a down
    loopback, and jobs, without capabilities, cannot configure it. Concurrent jobs could still reach each
    other through abstract Unix sockets, which gains a sample nothing against its own tests.
    """
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    user = libc.unshare(_CLONE_NEWUSER) == 0
    if user:
        _write_id_maps(uid, gid)
    # Root where user namespaces are off still gets these; an unprivileged user without them gets none.
    network = libc.unshare(_CLONE_NEWNET) == 0
    libc.unshare(_CLONE_NEWIPC)  # the host's System V IPC objects out of reach (jobs get their own too)
    pid = libc.unshare(_CLONE_NEWPID) == 0
    # A new anonymous session keyring: jobs must not inherit the caller's (its keys, its secrets). The
    # jobs' seccomp filter refuses the keyring calls anyway, where the filter exists.
    if seccomp.MACHINE in seccomp.KEYCTL:
        libc.syscall(seccomp.KEYCTL[seccomp.MACHINE], _KEYCTL_JOIN_SESSION_KEYRING, None)
    return {"user": user, "network": network, "pid": pid}


def become_pid1() -> None:
    """After :func:`enter_server_namespaces` granted ``pid``: fork; the child returns as PID 1 of the new
    namespace (the server proper), the parent waits for it and exits with its status.

    The parent keeps no descriptor but the ones the child also holds, and the child dies with it
    (``PR_SET_PDEATHSIG``), so killing the process the caller started still stops every job.
    """
    pid = os.fork()
    if pid == 0:
        _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        return
    os.closerange(3, 65536)  # the protocol pipes: the caller sees EOF when the server proper exits
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def own_pid_namespace() -> int:
    """A descriptor of the server's PID namespace, for :func:`fork_job` to return to after each fork."""
    return os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)


def fork_job(support: dict, pid_namespace: int | None) -> int:
    """``os.fork`` whose child is PID 1 of a fresh PID namespace (when ``support["pid"]``)."""
    if not support.get("pid") or pid_namespace is None:
        return os.fork()
    libc = _libc()
    _check(libc.unshare(_CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    try:
        pid = os.fork()
    except BaseException:
        libc.setns(pid_namespace, _CLONE_NEWPID)
        raise
    if pid:  # the next unshare(CLONE_NEWPID) is refused until the server is back in its own namespace
        _check(libc.setns(pid_namespace, _CLONE_NEWPID), "setns(back to the server's PID namespace)")
    return pid


# ------------------------------------------------------------------------------------------- job child


def enter_job_namespaces(workdir: str, support: dict) -> None:
    """In a fresh job child, as granted by the probe: an IPC namespace of its own (no System V / POSIX
    objects left by or for other jobs), every mount read-only, ``nosuid`` and ``nodev`` (except a few
    harmless devices), a tmpfs at ``workdir``, a read-only ``/proc`` of its own (as PID 1 of its
    namespace). Call :func:`drop_privileges` afterwards."""
    libc = _libc()
    flags = _CLONE_NEWNET * bool(support.get("own_network")) | _CLONE_NEWIPC * bool(support.get("ipc"))
    flags |= _CLONE_NEWNS * bool(support["readonly_mounts"])
    if flags:
        _check(libc.unshare(flags), "unshare")
    if not support["readonly_mounts"]:
        return
    # Private before anything is mounted: where the mounts are shared with the server's namespace (root
    # without a user namespace), the bind mounts below would otherwise appear there too.
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount private")
    devices = [d for d in HARMLESS_DEVICES if libc.mount(d, d, None, _MS_BIND, None) == 0]
    if _readonly_tree(libc):
        clear = _MountAttr(attr_clr=_MOUNT_ATTR_NODEV)  # on those bind mounts only: each is one device
        for device in devices:
            libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, device, 0, ctypes.byref(clear), ctypes.sizeof(clear))
    else:
        _readonly_each_mount(libc)
    # The job's only writable place: a small tmpfs of its own over the (empty) work directory. It
    # vanishes with the job's mount namespace, so nothing is left on the host and nothing is removed.
    options = f"size={TMPFS_MB}m,mode=0700".encode()
    _check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options), "tmpfs")
    # And a small /dev/shm of its own, for POSIX semaphores and shared memory (multiprocessing).
    if os.path.isdir("/dev/shm"):
        shm = f"size={SHM_MB}m,mode=1777".encode()
        libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, shm)
    if support.get("proc") and support["pid"]:
        flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        _check(libc.mount(b"proc", b"/proc", b"proc", flags, None), "proc")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]


_CapDataPair = _CapData * 2  # made here, once: creating a ctypes type in every job costs a millisecond


def _last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 63


_LAST_CAP = _last_capability()


def drop_privileges(support: dict) -> None:
    """No capabilities (bounding set, effective, permitted, inheritable; hence no ambient ones),
    ``no_new_privs``, not dumpable, and the seccomp filter (``seccomp.py``) where granted.

    A process that entered a user namespace holds every capability in it; without this, a job could
    undo its read-only mounts (``mount -o remount,rw /``) and write to the host's files as our user.
    Not dumpable: jobs share a user, so where they can see each other (no ``/proc`` of their own) one
    could otherwise read another's memory (its proof's nonce) through ``/proc/PID/mem``.
    """
    libc = _libc()
    _check(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    for capability in range(_LAST_CAP + 1):
        libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0)  # fails (harmlessly) without CAP_SETPCAP
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    header, data = _CapHeader(_CAPABILITY_VERSION_3, 0), _CapDataPair()
    _check(libc.capset(ctypes.byref(header), data), "capset")
    if support.get("seccomp"):
        seccomp.install(libc)


# ------------------------------------------------------------------------------------------------ probe


# What a job's isolation is made of: the keys of the probe's answer, each True where granted.
FEATURES = ("user", "network", "pid", "readonly_mounts", "proc", "ipc", "seccomp")


def probe_isolation(workdir: str, *, server: dict, pid_namespace: int | None) -> dict:
    """Which isolation this kernel grants a job, tried in real job children (in the server, after
    :func:`enter_server_namespaces`; ``server`` is what that returned).

    Everything at once first (one probe job where nothing is refused); else from a bare fork upwards,
    each piece kept only if a job with it (and what was kept before) runs: PID namespace, mounts,
    ``/proc`` (refused where a container masks parts of its own), IPC namespace, seccomp, and a network
    namespace per job when the server has none. Nothing is given up because something else failed.
    """
    can_pid = bool(server["pid"] and pid_namespace is not None)
    bare = {"user": server["user"], "network": server["network"], "own_network": False}
    bare.update(dict.fromkeys(("pid", "readonly_mounts", "proc", "ipc", "seccomp"), False))
    steps = [
        {"pid": True} if can_pid else None,
        {"readonly_mounts": True},
        {"proc": True},  # needs both of the above
        {"ipc": True},
        {"seccomp": True} if seccomp.FILTER is not None else None,
        {"own_network": True, "network": True} if not server["network"] else None,
    ]
    steps = [step for step in steps if step and not ("proc" in step and not can_pid)]
    everything = {k: v for step in steps for k, v in step.items()}
    granted = {**bare, **everything}
    if not _try_job(workdir, granted, pid_namespace):
        granted = dict(bare)
        for step in steps:
            if "proc" in step and not (granted["pid"] and granted["readonly_mounts"]):
                continue
            if _try_job(workdir, {**granted, **step}, pid_namespace):
                granted.update(step)
    refused = [k for k in FEATURES if not granted[k]]
    return {**granted, "reason": f"not granted: {', '.join(refused)}" if refused else ""}


def _try_job(workdir: str, attempt: dict, pid_namespace: int | None) -> bool:
    try:
        pid = fork_job(attempt, pid_namespace)
    except OSError:
        return False
    if pid == 0:
        try:
            enter_job_namespaces(workdir, attempt)
            drop_privileges(attempt)
            ok = not attempt["pid"] or os.getpid() == 1
            os._exit(0 if ok else 1)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _write_id_maps(uid: int, gid: int) -> None:
    """Map our own uid/gid into the user namespace just entered (ids read before entering it)."""
    for name, text in (
        ("setgroups", b"deny"),
        ("uid_map", b"%d %d 1" % (uid, uid)),
        ("gid_map", b"%d %d 1" % (gid, gid)),
    ):
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
        try:
            os.write(fd, text)
        finally:
            os.close(fd)


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _readonly_tree(libc) -> bool:
    """Every mount read-only, nosuid and nodev in one ``mount_setattr`` call (Linux 5.12+); False if
    refused. (Propagation is already private: :func:`enter_job_namespaces`.)"""
    flags = _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
    attr = _MountAttr(attr_set=flags)
    result = libc.syscall(
        _SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    return result == 0


def _readonly_each_mount(libc) -> None:
    """Older kernels: a read-only, nosuid, nodev bind remount of each mount point (the harmless devices
    too: no device at all on these kernels). Propagation is already private: :func:`enter_job_namespaces`."""
    with open("/proc/self/mountinfo") as handle:
        points = [line.split()[4].replace("\\040", " ") for line in handle]
    for point in reversed(points):
        try:
            kept = sum(ms for bit, ms in _KEEP_FLAGS.items() if os.statvfs(point).f_flag & bit)
        except OSError:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | kept
        libc.mount(None, point.encode(), None, flags, None)
    # Fail closed: a mount that stayed writable (a refused remount, a name this parser mangled) means
    # the probe must not report read-only mounts. Only what a path reaches counts: a mount hidden under
    # another one at the same point cannot be remounted, nor written, through any path.
    writable = []
    for point in dict.fromkeys(points):
        try:
            if not os.statvfs(point).f_flag & os.ST_RDONLY:
                writable.append(point)
        except OSError:
            continue
    if writable:
        raise OSError(f"mounts still writable after the read-only remount: {writable[:5]}")
