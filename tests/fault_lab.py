"""The stage of a fault test: guests, receivers and senders as real processes, on loopback or
across a NamespacePair, and the rules every fault test ends with: exactly one guest runs
or is resumable (with the oracle ok), and a second, clean migration completes.

A Lab owns every process and mount it made and removes them, and the images, whatever
happens. It knows the zcmigrate commands and the files beside an image; the faults
themselves are the tests' (tests/netns.py has the network's).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.children import ROOT, Child
from tests.netns import NamespacePair, enter
from zcmigrate.migrate.guest.layout import CONTROL_MAGIC, Field, GuestState, read_control_header
from zcmigrate.migrate.imagefiles import control_path, state_path
from zcmigrate.migrate.keyfile import keygen

# --peer-timeout of every send and receive (through ZCMIGRATE_PEER_TIMEOUT, so that
# today's code, which has no such option yet, still runs and shows what it does).
PEER_TIMEOUT = 5.0
# Added to every bound taken from PEER_TIMEOUT: a dead peer is found on a timer tick
# after the timeout (keepalive probes, TCP_USER_TIMEOUT, a wait's poll slice), and then
# the process joins its threads, unmaps a 256 MiB image and exits, on 2 cores that other
# test runs share.
MARGIN = 5.0
# The bound on anything a dead or silent peer can hold up.
PEER_BOUND = PEER_TIMEOUT + MARGIN
# A paused guest whose sender died resumes by itself within a second (issue 10); we look
# every 10 ms and the machine is shared: half a second more.
LEASE = 1.0
LEASE_MARGIN = 0.5
# A whole clean 256 MiB migration with its process start-ups, on a loaded 2-core machine.
MIGRATION_BOUND = 90.0


_FULL = re.compile(r"no space left|\bfull\b", re.I)
# A number near "need(s/ed)", and one near "free" or "available", in whatever words:
# "needs 256 MiB, 128 MiB free", "need 268435456 bytes; available: 134217728".
_NEED = re.compile(r"need\w*\W{0,3}[^\n\d]{0,30}\d", re.I)
_FREE = re.compile(r"\d[\d.,]*\s*\w{0,5}(\s+\w+){0,2}\s+(free|available)"
                   r"|(free|available)\W{0,3}[^\n\d]{0,30}\d", re.I)


def reports_full(text: str) -> str | None:
    """What is missing from a report of a full destination ("No space left" or "full",
    how much is needed and how much is free); None if nothing is."""
    missing = [what for what, rx in (("that it is full", _FULL), ("how much is needed", _NEED),
                                     ("how much is free", _FREE)) if not rx.search(text)]
    return ", ".join(missing) or None


def guest_header(image: Path) -> list[int] | None:
    head = read_control_header(control_path(image))
    if head is None or head[Field.MAGIC] != CONTROL_MAGIC:
        return None
    return head


def guest_moves(image: Path, within: float = 1.0) -> bool:
    """The guest on `image` is running: its write counter moves within `within` seconds."""
    first = guest_header(image)
    if first is None:
        return False
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        time.sleep(0.01)
        now = guest_header(image)
        if now is None:
            return False
        if now[Field.TOUCHED] != first[Field.TOUCHED]:
            return True
    return False


def wait_running(image: Path, deadline: float) -> float | None:
    """The monotonic time at which the guest on `image` was seen running (its counter
    moved) before `deadline`, or None."""
    while time.monotonic() < deadline:
        if guest_moves(image, within=min(0.2, max(deadline - time.monotonic(), 0.01))):
            return time.monotonic()
    return None


def stays_paused(image: Path, seconds: float) -> bool:
    """The guest on `image` does not run for `seconds` (paused, or gone)."""
    return not guest_moves(image, within=seconds)


def scratch_dir(prefix: str) -> Path:
    """A new directory for images: in /dev/shm, where the commit's fsyncs cost nothing
    (no test here is about the disk's speed), else the system's temporary directory."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=shm if shm.is_dir() else None))


def guest_state(image: Path) -> GuestState | None:
    head = guest_header(image)
    return None if head is None else GuestState(head[Field.STATE])


def committed(image: Path) -> bool:
    """The destination committed `image`: its device state is written (the last step of
    a commit; an image without its state is not committed)."""
    return state_path(image).exists()


@dataclass
class Receiver:
    child: Child
    image: Path
    port: int


@dataclass
class Lab:
    """Where and how a fault test's processes run. With `pair`, receivers run in its dest
    namespace and senders in its source namespace; without, everything is on loopback."""

    workdir: Path
    pair: NamespacePair | None = None
    zerocopy: str = "off"
    channels: int = 2
    peer_timeout: float = PEER_TIMEOUT
    template: Path | None = None
    children: list[Child] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Control sockets: a short directory of our own (a socket path has 107 bytes).
        self.runtime = Path(tempfile.mkdtemp(prefix="zcf-"))
        # Both ends hold one key, as a deployment would (a receiver listens beyond
        # loopback only with a key): the faults hit sealed, mutually proven migrations.
        self.keydir = Path(tempfile.mkdtemp(prefix="zck-"))
        self.key = self.keydir / "key"
        keygen(self.key)

    # ---------------------------------------------------------- processes

    def env(self, faults: tuple[str, ...] = ()) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZCMIGRATE_")}
        env.update(PYTHONUNBUFFERED="1", ZCMIGRATE_PEER_TIMEOUT=f"{self.peer_timeout:g}",
                   ZCMIGRATE_RUNTIME_DIR=str(self.runtime),
                   ZCMIGRATE_AUTH_KEY_FILE=str(self.key))
        if faults:
            env["ZCMIGRATE_FAULT"] = ",".join(faults)
        return env

    @property
    def source_ns(self) -> str | None:
        return self.pair.source if self.pair else None

    @property
    def dest_ns(self) -> str | None:
        return self.pair.dest if self.pair else None

    def host_of(self, ns: str | None) -> str:
        if self.pair is None:
            return "127.0.0.1"
        return self.pair.source_addr if ns == self.pair.source else self.pair.dest_addr

    def spawn(self, *args: str, name: str, ns: str | None = None,
              faults: tuple[str, ...] = ()) -> Child:
        child = Child.zcmigrate(*args, name=name, env=self.env(faults), prefix=enter(ns))
        self.children.append(child)
        return child

    def guest(self, image: Path, *, size: str | None = None, dirty_rate: str = "32M",
              fill: str = "half") -> Child:
        """A running guest on `image`: a new image of `size` (256M by default), or, with
        no size and a lab template, a copy of the template (an image a guest made
        earlier: copying it costs a fifth of making one)."""
        if size is None and self.template is not None:
            shutil.copyfile(self.template, image)
            args = ["guest", str(image), "--dirty-rate", dirty_rate]
        else:
            args = ["guest", str(image), "--size", size or "256M", "--dirty-rate",
                    dirty_rate, "--fill", fill]
        g = self.spawn(*args, name=f"guest {image.name}")
        g.wait_line("guest running", timeout=120)
        return g

    def resume_guest(self, image: Path, *, dirty_rate: str = "32M",
                     ns: str | None = None) -> Child:
        g = self.spawn("guest", str(image), "--resume", "--dirty-rate", dirty_rate,
                       name=f"resumed guest {image.name}", ns=ns)
        g.wait_line("guest running", timeout=120)
        return g

    def receive(self, image: Path, *extra: str, faults: tuple[str, ...] = (),
                ns: str | bool | None = True, name: str = "receiver") -> Receiver:
        """A receiver, once it listens. `ns`: True for the lab's destination side (its
        dest namespace, or loopback), a namespace's name, or None for this one."""
        where = self.dest_ns if ns is True else (ns or None)
        child = self.spawn("receive", str(image), "--listen", f"{self.host_of(where)}:0",
                           "--json", "--log-format", "json", *extra, name=name, ns=where,
                           faults=faults)
        line = child.wait_line("listening:", timeout=60)
        return Receiver(child, image, int(line.rsplit(":", 1)[1]))

    def send(self, image: Path, port: int, *extra: str, faults: tuple[str, ...] = (),
             host: str | None = None, ns: str | bool | None = True,
             name: str = "sender") -> Child:
        """A sender to `port` on the other side (or `host`). `ns`: True for the lab's
        source side, a namespace's name, or None for this one."""
        where = self.source_ns if ns is True else (ns or None)
        if host is None:
            host = self.host_of(self.dest_ns if where == self.source_ns else self.source_ns)
        return self.spawn("send", str(image), "--to", f"{host}:{port}", "--json",
                          "--log-format", "json", "--multifd-channels", str(self.channels),
                          "--multifd-zerocopy", self.zerocopy, *extra, name=name, ns=where,
                          faults=faults)

    def run(self, *args: str, timeout: float = 60, ns: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A short zcmigrate command (resume, retire, guest --check, status...) to its end;
        TimeoutExpired past `timeout` (the child is killed)."""
        return subprocess.run([*enter(ns), sys.executable, "-m", "zcmigrate", *args],
                              cwd=ROOT, env={**self.env(), **(env or {})},
                              capture_output=True, text=True, timeout=timeout, check=False)

    def oracle(self, image: Path) -> subprocess.CompletedProcess[str]:
        return self.run("guest", str(image), "--check")

    # ---------------------------------------------------------------- rules

    def assert_nothing_committed(self, dst: Path, why: str = "") -> None:
        assert not committed(dst), (
            f"{why}: the destination committed {dst} (state file {state_path(dst)})")

    def assert_one_guest(self, guest: Child, src: Path, dst: Path) -> str:
        """Exactly one guest: the source's runs (its counter moves) and nothing is
        committed at `dst`, or `dst` is committed with the oracle ok and the source guest
        is gone (exited after the commit, or retired). Returns where it is."""
        at_dst = committed(dst)
        if at_dst:
            check = self.oracle(dst)
            assert check.returncode == 0, (
                f"the destination committed {dst} but its oracle fails: "
                f"{check.stdout}{check.stderr}")
            # A source guest told to exit (after a commit) or retired goes within seconds.
            with contextlib.suppress(AssertionError):
                guest.wait_exit(10)
            assert not guest.alive, (
                f"two guests: {dst} is committed and the source guest still runs "
                f"(state {guest_state(src)}, moving {guest_moves(src)})\n{guest.describe()}")
            return "destination"
        assert guest.alive and guest_moves(src), (
            f"no guest: nothing committed at {dst} and the source guest does not run "
            f"(state {guest_state(src)})\n{guest.describe()}")
        return "source"

    def settle_uncertain(self, src: Path, dst: Path) -> str:
        """What an operator does after `send` exit 6 (or a sender that died after the
        device state left): retire the source guest if the destination committed, resume
        it if not. Returns where the guest is."""
        if committed(dst):
            r = self.run("retire", str(src), ns=self.source_ns)
            assert r.returncode == 0, f"zcmigrate retire {src}: exit {r.returncode}: " \
                                      f"{r.stdout}{r.stderr}"
            return "destination"
        r = self.run("resume", str(src), ns=self.source_ns)
        assert r.returncode == 0, f"zcmigrate resume {src}: exit {r.returncode}: " \
                                  f"{r.stdout}{r.stderr}"
        return "source"

    def migrate(self, image: Path, to: Path, *, from_ns: str | None,
                to_ns: str | None) -> tuple[Child, Receiver]:
        """A clean migration of the guest on `image` to `to`; both processes ended."""
        recv = self.receive(to, ns=to_ns, name="receiver (clean run)")
        send = self.send(image, recv.port, ns=from_ns, host=self.host_of(to_ns),
                         name="sender (clean run)")
        code = send.wait_exit(MIGRATION_BOUND)
        assert code == 0, f"the clean migration failed\n{send.describe()}\n{recv.child.describe()}"
        rcode = recv.child.wait_exit(PEER_BOUND)
        assert rcode == 0, f"the clean migration's receiver failed\n{recv.child.describe()}"
        check = self.oracle(to)
        assert check.returncode == 0, f"oracle after the clean migration: {check.stdout}"
        return send, recv

    def second_migration(self, where: str, guest: Child, src: Path, dst: Path) -> None:
        """After a fault: migrate the one guest again, wherever it is, and check it
        completes. From the source into `dst` again (a leftover there must not stand in
        the way); from the destination back to a new image beside the source's."""
        if where == "source":
            self.migrate(src, dst, from_ns=self.source_ns, to_ns=self.dest_ns)
            guest.wait_exit(10)
            return
        resumed = self.resume_guest(dst, ns=self.dest_ns)
        back = src.with_name(f"back-{src.name}")
        self.migrate(dst, back, from_ns=self.dest_ns, to_ns=self.source_ns)
        resumed.wait_exit(10)

    # --------------------------------------------------------------- clean-up

    def mount_tmpfs(self, where: Path, size: str, *options: str) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        opts = ",".join((f"size={size}", *options))
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "zcfault", str(where)],
                       check=True, capture_output=True, timeout=30)
        self.mounts.append(where)
        return where

    def close(self) -> None:
        for child in reversed(self.children):
            child.close()
        for m in reversed(self.mounts):
            r = subprocess.run(["umount", str(m)], capture_output=True, timeout=30, check=False)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(m)], capture_output=True, timeout=30,
                               check=False)
        shutil.rmtree(self.runtime, ignore_errors=True)
        shutil.rmtree(self.keydir, ignore_errors=True)
        # The images are 256 MiB each: do not leave them for pytest's basetemp.
        for p in self.workdir.rglob("*"):
            if p.is_file() and not any(m in p.parents for m in self.mounts):
                with contextlib.suppress(OSError):
                    p.unlink()


def sigcont(child: Child) -> None:
    child.signal(signal.SIGCONT)
