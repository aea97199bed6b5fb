"""A tiny sd_notify(3) and sd_listen_fds(3) client: readiness and status to systemd, and the
sockets systemd passed us by socket activation. No dependency beyond the standard library;
it knows nothing of migrations, only the systemd protocol over datagram sockets.
"""

from __future__ import annotations

import errno
import os
import socket

# sd-daemon.h: passed file descriptors start right after stdin, stdout and stderr.
SD_LISTEN_FDS_START = 3

_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _notify_address(value: str) -> str | bytes:
    if value.startswith("@"):
        # An abstract socket: the name begins with a NUL byte instead of the "@".
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # systemd >= 254 also speaks vsock: ("vsock:CID:PORT"); a unit on this project's
    # hosts never gets one, and guessing would drop READY=1 on the floor.
    raise OSError(errno.EAFNOSUPPORT, f"NOTIFY_SOCKET={value!r}: only paths and @abstract")


def notify(*lines: str) -> bool:
    """Send `lines` ("READY=1", "STATUS=...", "STOPPING=1") to systemd as one datagram.

    Returns False when $NOTIFY_SOCKET is unset (not running under systemd, or a unit
    that is not Type=notify), True once sent. Raises ValueError for a line that holds a
    newline or no "=", OSError when the socket cannot be reached: a service that cannot
    say READY=1 will be killed by systemd, so that must not pass silently.
    """
    for line in lines:
        if "\n" in line or "=" not in line:
            raise ValueError(f"sd_notify lines are single VARIABLE=value lines, not {line!r}")
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    address = _notify_address(target)
    payload = "\n".join(lines).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        # One datagram, so systemd applies the assignments together (READY=1 with
        # its STATUS=). The kernel attaches our credentials; systemd uses them to
        # tell the main process from its children (NotifyAccess=main).
        sock.sendto(payload, address)
    return True


def _unset_listen_environment() -> None:
    for name in _LISTEN_VARIABLES:
        os.environ.pop(name, None)


def listen_fds() -> list[socket.socket]:
    """The sockets systemd passed by socket activation, as socket objects, fd 3 first.

    As sd_listen_fds(1): only when $LISTEN_PID names this process (the variables are
    inherited by children, the descriptors are meant for us alone), the descriptors are
    made close-on-exec, and $LISTEN_PID, $LISTEN_FDS and $LISTEN_FDNAMES are unset
    whatever the outcome, so that no child believes it was activated. Returns [] when
    nothing was passed to us; raises ValueError for malformed variables.
    """
    try:
        pid_text = os.environ.get("LISTEN_PID")
        if pid_text is None:
            return []
        try:
            pid = int(pid_text)
        except ValueError:
            raise ValueError(f"LISTEN_PID={pid_text!r} is not a process id") from None
        if pid != os.getpid():
            return []
        fds_text = os.environ.get("LISTEN_FDS")
        if fds_text is None:
            return []
        try:
            count = int(fds_text)
        except ValueError:
            raise ValueError(f"LISTEN_FDS={fds_text!r} is not a number") from None
        if count <= 0:
            raise ValueError(f"LISTEN_FDS={fds_text!r}: expected a positive number")
        fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
        for fd in fds:
            os.set_inheritable(fd, False)
        # socket(fileno=) asks the kernel for family, type and protocol (SO_DOMAIN...).
        return [socket.socket(fileno=fd) for fd in fds]
    finally:
        _unset_listen_environment()
