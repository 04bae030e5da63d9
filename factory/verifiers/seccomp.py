"""A small seccomp filter for sandbox jobs: refuse the system calls that reach across jobs or the host.

Installed by every job after it dropped its capabilities (``isolation.drop_privileges``; seccomp filters
need ``no_new_privs``). It refuses with ``EPERM``:

* the kernel keyrings (``add_key``, ``request_key``, ``keyctl``): keyrings are per user, not per
  namespace, so a job could read or clear the caller's session keyring and leave keys for later jobs;
* other processes' memory (``ptrace``, ``process_vm_readv``, ``process_vm_writev``);
* new user namespaces (``unshare`` or ``clone`` with ``CLONE_NEWUSER``; ``clone3``, whose flags a filter
  cannot read, answers ``ENOSYS`` so that libc falls back to ``clone``) and ``io_uring``: both are
  common ways into kernel bugs, and no test program needs them;
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
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_X32_BIT, _CLONE_NEWUSER = 0x40000000, 0x10000000
_ARCH_OFFSET, _NR_OFFSET, _ARG0_OFFSET = 4, 0, 16  # struct seccomp_data (arg0's low 32 bits: little-endian)

# audit arch; refused outright; refused with CLONE_NEWUSER in the first argument; clone3
_ARCHES = {
    "x86_64": (
        0xC000003E,
        {"add_key": 248, "request_key": 249, "keyctl": 250, "ptrace": 101, "process_vm_readv": 310,
         "process_vm_writev": 311, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427},
        {"unshare": 272, "clone": 56},
        435,
    ),
    "aarch64": (
        0xC00000B7,
        {"add_key": 217, "request_key": 218, "keyctl": 219, "ptrace": 117, "process_vm_readv": 270,
         "process_vm_writev": 271, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427},
        {"unshare": 97, "clone": 220},
        435,
    ),
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


def assemble(machine: str) -> list[tuple[int, int, int, int]] | None:
    """The BPF instructions (code, jt, jf, k) for ``machine``; None where there is no filter.

    Jump targets are written as labels and resolved here, since BPF jumps are relative and forward-only.
    """
    if machine not in _ARCHES:
        return None
    arch, denied, no_new_user, clone3 = _ARCHES[machine]
    program: list[tuple] = [
        (_LD_W_ABS, None, None, _ARCH_OFFSET),
        (_JEQ_K, "native", "deny", arch),
        ("native",),
        (_LD_W_ABS, None, None, _NR_OFFSET),
    ]
    if machine == "x86_64":
        program.append((_JGE_K, "deny", None, _X32_BIT))
    program.append((_JEQ_K, "enosys", None, clone3))
    program += [(_JEQ_K, "flags", None, number) for number in sorted(no_new_user.values())]
    program += [(_JEQ_K, "deny", None, number) for number in sorted(denied.values())]
    program += [
        (_RET_K, None, None, _RET_ALLOW),
        ("flags",),
        (_LD_W_ABS, None, None, _ARG0_OFFSET),
        (_JSET_K, "deny", None, _CLONE_NEWUSER),
        (_RET_K, None, None, _RET_ALLOW),
        ("enosys",),
        (_RET_K, None, None, _RET_ERRNO | errno.ENOSYS),
        ("deny",),
        (_RET_K, None, None, _RET_ERRNO | errno.EPERM),
    ]
    labels, position = {}, 0
    for item in program:
        if len(item) == 1:
            labels[item[0]] = position
        else:
            position += 1
    code, position = [], 0
    for item in program:
        if len(item) == 1:
            continue
        op, jt, jf, k = item
        offset = {None: 0, **{name: at - position - 1 for name, at in labels.items()}}
        code.append((op, offset[jt], offset[jf], k))
        position += 1
    return code


def build(machine: str) -> _Program | None:
    """The BPF program for ``machine`` (``platform.machine()``); None where there is none."""
    code = assemble(machine)
    if code is None:
        return None
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
