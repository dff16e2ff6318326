"""The seccomp filter of every sandboxed process, compiled with libseccomp (pyseccomp).

An allowlist of the syscalls Python, torch and g++ make would be tighter, but a missed
one fails jobs in ways that are hard to tell from a real error; so this denies, with
EPERM, what a compile job never needs and what sandbox escapes and kernel exploits
lean on: debugging other processes, namespaces and mounts, kernel keyrings, BPF,
perf, userfaultfd, io_uring, module loading. ``clone3`` answers ENOSYS (so libc falls
back to ``clone``, whose flags a filter can read) and ``clone`` may not make a user
namespace.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile

DENIED = (
    # other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # namespaces, mounts, roots
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "mount_setattr",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree",
    "open_by_handle_at", "name_to_handle_at",
    # kernel attack surface a compiler never touches
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog", "iopl", "ioperm",
    "settimeofday", "clock_settime", "adjtimex", "clock_adjtime", "lookup_dcookie",
    "vhangup", "personality",
)
CLONE_NEWUSER = 0x10000000


@functools.cache
def unavailable() -> str | None:
    """None if the filter can be built here, else what is missing and how to get it."""
    try:
        _program()
    except (ImportError, OSError, RuntimeError) as exc:
        return (f"the seccomp filter cannot be built ({type(exc).__name__}: {exc}); "
                "install libseccomp2 (apt-get install libseccomp2) and pyseccomp")
    return None


@functools.cache
def _program() -> bytes:
    import pyseccomp as sc

    rules = sc.SyscallFilter(defaction=sc.ALLOW)
    for name in DENIED:
        try:
            rules.add_rule(sc.ERRNO(errno.EPERM), name)
        except (ValueError, RuntimeError, OSError):
            continue  # not a syscall on this architecture
    rules.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    rules.add_rule(sc.ERRNO(errno.EPERM), "clone",
                   sc.Arg(0, sc.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
    with tempfile.TemporaryFile() as handle:
        rules.export_bpf(handle)
        handle.seek(0)
        return handle.read()


def filter_fd() -> int:
    """A new fd holding the compiled filter, for ``bwrap --seccomp FD`` (caller closes)."""
    fd = os.memfd_create("lowering-seccomp", 0)
    os.write(fd, _program())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
