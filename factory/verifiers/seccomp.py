"""A small seccomp filter for sandbox jobs: refuse the system calls that reach across jobs or the host.

Installed by every job after it dropped its capabilities (``isolation.drop_privileges``; seccomp filters
need ``no_new_privs``). It refuses with ``EPERM``:

* the kernel keyrings (``add_key``, ``request_key``, ``keyctl``): keyrings are per user, not per
  namespace, so a job could read or clear the caller's session keyring and leave keys for later jobs;
* other processes' memory (``ptrace``, ``process_vm_readv``, ``process_vm_writev``);
* every system call of another ABI (32-bit ``int 0x80`` on x86_64, the x32 ABI), whose numbers differ
  and would bypass the list.

Everything else is allowed: this is a deny list for what the namespaces cannot separate, not a
whitelist. Only x86_64 and aarch64 have a filter; elsewhere :data:`FILTER` is None and the sandbox
reports ``seccomp: False``.
"""

from __future__ import annotations

import ctypes
import errno
import platform

_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_X32_BIT = 0x40000000

# audit arch, denied system call numbers
_ARCHES = {
    "x86_64": (0xC000003E, {"add_key": 248, "request_key": 249, "keyctl": 250, "ptrace": 101,
                            "process_vm_readv": 310, "process_vm_writev": 311}),
    "aarch64": (0xC00000B7, {"add_key": 217, "request_key": 218, "keyctl": 219, "ptrace": 117,
                             "process_vm_readv": 270, "process_vm_writev": 271}),
}  # fmt: skip
KEYCTL = {"x86_64": 250, "aarch64": 219}  # for isolation.py's session keyring


class _Filter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Filter))]


def build(machine: str) -> _Program | None:
    """The BPF program for ``machine`` (``platform.machine()``); None where there is none."""
    if machine not in _ARCHES:
        return None
    arch, denied = _ARCHES[machine]
    deny = _RET_ERRNO | errno.EPERM
    code = [(_LD_W_ABS, 0, 0, 4)]  # seccomp_data.arch
    code.append((_JEQ_K, 1, 0, arch))  # native ABI: go on; else deny
    code.append((_RET_K, 0, 0, deny))
    code.append((_LD_W_ABS, 0, 0, 0))  # seccomp_data.nr
    if machine == "x86_64":
        code.append((_JGE_K, 0, 1, _X32_BIT))  # x32 system calls: deny
        code.append((_RET_K, 0, 0, deny))
    numbers = sorted(denied.values())
    for i, number in enumerate(numbers):
        # On a match jump to the deny at the end; else fall through to the next comparison.
        code.append((_JEQ_K, len(numbers) - i, 0, number))
    code.append((_RET_K, 0, 0, _RET_ALLOW))
    code.append((_RET_K, 0, 0, deny))
    array = (_Filter * len(code))(*[_Filter(*c) for c in code])
    program = _Program(len(code), ctypes.cast(array, ctypes.POINTER(_Filter)))
    program._keep = array  # the array must live as long as the program
    return program


MACHINE = platform.machine()
FILTER = build(MACHINE)  # built once in the server; every job installs the same one


def install(libc) -> bool:
    """Install :data:`FILTER` in this process (after ``no_new_privs``); False where there is none."""
    if FILTER is None:
        return False
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(FILTER), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
    return True
