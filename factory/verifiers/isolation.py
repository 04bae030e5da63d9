"""Kernel isolation for sandbox jobs: user, network, mount and PID namespaces (Linux), probed, not assumed.

Python 3.11 has no ``os.unshare``, so ``unshare``, ``mount`` and ``mount_setattr`` are called through
ctypes. Everything here runs in the sandbox server or in a freshly forked job child (see
``sandbox_server.py``); nothing touches the caller's process.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
# mount_setattr(2) (x86_64 and aarch64 share the number), AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY.
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 0x1
TMPFS_MB = 64  # the job's working directory (with mount namespaces); files are capped by RLIMIT_FSIZE too
# statvfs flag bits that a read-only bind remount must repeat (the kernel refuses to drop them).
_KEEP_FLAGS = {2: 2, 4: 4, 8: 8, 1024: 1024, 2048: 2048, 4096: 1 << 21}  # nosuid nodev noexec noatime ...


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def enter_job_namespaces(workdir: str, support: dict) -> None:
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
        options = f"size={TMPFS_MB}m,mode=0700".encode()
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
                    enter_job_namespaces(workdir, attempt)
                    inner = os.fork()
                    if inner == 0:
                        os._exit(0 if mount_own_proc(attempt) else 1)
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


def mount_own_proc(support: dict) -> bool:
    """As PID 1 of a new PID namespace: a /proc of its own, so no other process (or its environment,
    ``/proc/PID/environ``) is visible. False when not granted."""
    if not (support["pid"] and support["readonly_mounts"]):
        return False
    return _libc().mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None) == 0
