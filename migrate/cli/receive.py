"""`zcmigrate receive`: listen, receive migrations into an image, commit, report.

Options, signals, systemd notifications, output and exit codes only: the migration is
migrate.destination's. It knows nothing of the source side.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from pathlib import Path

import click

from zcmigrate import ZcmigrateError
from zcmigrate.channel import sdnotify
from zcmigrate.channel.aead import CIPHERS
from zcmigrate.channel.errors import ChannelError
from zcmigrate.channel.zcsocket import Listener, format_hostport
from zcmigrate.migrate.cli import logs
from zcmigrate.migrate.cli.options import (
    AUTH_KEY,
    LOG_FORMAT,
    PEER_TIMEOUT,
    RECEIVE_EXIT_CODES,
    json_option,
    parse_hostport,
    read_key,
)
from zcmigrate.migrate.cli.types import BandwidthType, SizeType
from zcmigrate.migrate.destination import DestinationJob
from zcmigrate.migrate.errors import EXIT_COMMITTED_UNACKNOWLEDGED, ReceiveError
from zcmigrate.migrate.imagefiles import lock_path, resume_path
from zcmigrate.migrate.imagelock import ImageLock
from zcmigrate.migrate.incoming import claim_destination


@click.command("receive", epilog=RECEIVE_EXIT_CODES)
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path),
                envvar="ZCMIGRATE_IMAGE")
@click.option("--listen", default="0.0.0.0:4444", show_default=True,
              envvar="ZCMIGRATE_LISTEN", show_envvar=True,
              help="HOST:PORT to listen on (port 0: any free port, printed on stdout).")
@click.option("--serve", is_flag=True, envvar="ZCMIGRATE_SERVE", show_envvar=True,
              help="Stay up and accept successive migrations (the systemd service).")
@click.option("--accept-timeout", type=click.FloatRange(0), default=0.0, show_default=True,
              envvar="ZCMIGRATE_ACCEPT_TIMEOUT", show_envvar=True,
              help="Seconds to wait for a source; 0 = forever.")
@click.option("--replace", is_flag=True, envvar="ZCMIGRATE_REPLACE", show_envvar=True,
              help="Overwrite an existing IMAGE at the commit (never one a guest runs on).")
@PEER_TIMEOUT
@click.option("--max-image-size", type=SizeType(), default=None,
              envvar="ZCMIGRATE_MAX_IMAGE_SIZE", show_envvar=True,
              help="The largest image a source may propose, e.g. 64G [default: what the "
              "directory can hold].")
@click.option("--max-device-state", type=SizeType(), default="1M", show_default=True,
              envvar="ZCMIGRATE_MAX_DEVICE_STATE", show_envvar=True,
              help="The largest device state a source may send.")
@click.option("--guest-dirty-rate", type=BandwidthType(), default="64M", show_default=True,
              envvar="ZCMIGRATE_GUEST_DIRTY_RATE", show_envvar=True,
              help="Post-copy: the dirty rate of the guest this receiver starts on IMAGE "
              "(`zcmigrate guest IMAGE --postcopy SOCKET`, in a session of its own).")
@click.option("--postcopy-recover-timeout", type=click.FloatRange(0), default=0.0,
              show_default=True, envvar="ZCMIGRATE_POSTCOPY_RECOVER_TIMEOUT", show_envvar=True,
              help="Post-copy recovery: after a break, seconds to wait for the source's "
              "`zcmigrate send IMAGE --resume` before exiting 8; 0 = forever. The guest here "
              "waits for its missing pages either way.")
@click.option("--resume", "take_over", is_flag=True, envvar="ZCMIGRATE_RESUME",
              show_envvar=True,
              help="Post-copy recovery after the last receiver on IMAGE died: take over the "
              "guest that waits on IMAGE for its pages, then wait for the source's `zcmigrate "
              "send SOURCE_IMAGE --resume` as after any break.")
@AUTH_KEY
@click.option("--require-cipher", type=click.Choice(list(CIPHERS)), default=None,
              envvar="ZCMIGRATE_REQUIRE_CIPHER", show_envvar=True,
              help="With a key, accept only sources that chose this cipher (send --cipher); "
              "aes-128-gcm where policy asks for an algorithm NIST approves. [default: "
              "either]")
@click.option("--insecure", is_flag=True, envvar="ZCMIGRATE_INSECURE", show_envvar=True,
              help="Listen beyond loopback without a key: any host that reaches the port "
              "can then write IMAGE. Only on a network where every host is trusted.")
@json_option("Print the result as JSON.")
@LOG_FORMAT
def receive_command(image: Path, listen: str, serve: bool, accept_timeout: float,
                    replace: bool, peer_timeout: float, max_image_size: int | None,
                    max_device_state: int, guest_dirty_rate: int,
                    postcopy_recover_timeout: float, take_over: bool,
                    auth_key_file: Path | None, require_cipher: str | None,
                    insecure: bool, as_json: bool, log_format: str) -> None:
    """Receive a migration into IMAGE.

    Pages land in IMAGE.incoming; IMAGE and its device state IMAGE.state are replaced
    only when the migration commits. Resume the guest with `zcmigrate guest IMAGE
    --resume`.

    When the source runs with --postcopy, this receiver starts the guest itself, at the
    start of the migration, as `zcmigrate guest IMAGE --postcopy SOCKET` in a session
    of its own (output in IMAGE.guest.log; IMAGE must be on a tmpfs, and is put in
    place then): it waits for its device state, runs from the switch on, and outlives
    the receiver. Should the source's connection break during post-copy, this receiver
    keeps the guest's link and waits (--postcopy-recover-timeout) for the source's
    `zcmigrate send IMAGE --resume`, which finishes the migration.
    """
    logs.configure(log_format)
    host, port = parse_hostport(listen)
    key = read_key(auth_key_file)
    image = image.absolute()
    if require_cipher is not None and key is None:
        raise click.UsageError("--require-cipher goes with --auth-key-file: without a key "
                               "nothing is encrypted")
    if take_over and (serve or replace):
        raise click.UsageError("--resume takes over one waiting post-copy guest: not with "
                               "--serve or --replace")
    try:
        if take_over:
            if not resume_path(image).exists():  # before the lock, which leaves a file
                raise click.ClickException(
                    f"nothing to take over: {image} is not the destination of an "
                    f"interrupted post-copy (no {resume_path(image).name}); nothing was "
                    "changed")
            # IMAGE exists (its guest runs on it): only no other receiver may own it.
            claim = ImageLock(lock_path(image), f"cannot take over the post-copy of {image}")
        else:
            # Everything that can be known before a source connects is checked before we
            # say we are ready: the directory, another receiver on IMAGE, IMAGE itself.
            claim = claim_destination(image, replace=replace)
    except ZcmigrateError as e:
        raise click.ClickException(str(e)) from e
    try:
        socks = sdnotify.listen_fds()
        listener = Listener.from_socket(socks[0]) if socks else Listener(host, port)
    except ChannelError as e:
        claim.release()
        raise click.ClickException(str(e)) from e
    if key is None and not insecure and not listener.is_loopback:
        where = format_hostport(*listener.address)
        listener.close()
        claim.release()
        raise click.UsageError(
            f"refusing to listen on {where} without a key: any "
            f"host that reaches the port could write {image}. Give --auth-key-file (make "
            "one with `zcmigrate keygen FILE` and give it to the source too), listen on "
            "127.0.0.1, or pass --insecure on a network where every host is trusted."
        )
    click.echo(f"listening: {format_hostport(*listener.address)}")
    sys.stdout.flush()
    stopping = threading.Event()
    current: list[DestinationJob] = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()
        sdnotify.notify("STOPPING=1", f"STATUS=stopping on {signal.Signals(signum).name}")
        listener.shutdown()
        for job in current:
            job.cancel(f"{signal.Signals(signum).name} received")

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    sdnotify.notify("READY=1", f"STATUS=listening on {format_hostport(*listener.address)}")
    code = 0
    try:
        while not stopping.is_set():
            job = DestinationJob(
                image, listener, auth_key=key, accept_timeout=accept_timeout or None,
                status=_status_line, peer_timeout=peer_timeout, replace=replace,
                max_image_size=max_image_size, max_device_state=max_device_state,
                guest_args=["--dirty-rate", str(guest_dirty_rate)],
                postcopy_recover_timeout=postcopy_recover_timeout or None,
                take_over=take_over, require_cipher=require_cipher,
            )
            current[:] = [job]
            try:
                result = job.run()
            except ReceiveError as e:
                if stopping.is_set() and serve:
                    break
                click.echo(f"zcmigrate: {e}", err=True)
                code = e.exit_code
                if not serve:
                    break
                continue
            if as_json:
                click.echo(json.dumps(result.to_dict(), indent=2))
            elif result.postcopy is not None:
                click.echo(f"committed: {result.image} after post-copy; its guest runs "
                           f"(pid {result.postcopy['guest-pid']}, started by this receiver)")
            else:
                click.echo(f"committed: {result.image} ({result.normal_pages} normal pages, "
                           f"{result.zero_pages} zero pages, {result.syncs} syncs); "
                           f"resume with: zcmigrate guest {result.image} --resume")
            sys.stdout.flush()
            code = 0
            if not result.acknowledged:
                click.echo(f"zcmigrate: {result.image} is committed, but the source did not "
                           "get the acknowledgement: its guest stays paused there; retire it "
                           "on the source with `zcmigrate retire SOURCE_IMAGE`", err=True)
                code = EXIT_COMMITTED_UNACKNOWLEDGED
            if not serve:
                break
        if serve and stopping.is_set() and code != EXIT_COMMITTED_UNACKNOWLEDGED:
            # Stopped by SIGTERM between or during migrations, nothing left half-done:
            # a clean stop, whatever happened to earlier migrations (systemctl stop).
            code = 0
    finally:
        listener.close()
        claim.release()
    sys.exit(code)


def _status_line(text: str) -> None:
    """A STATUS= line for systemd; an unreachable NOTIFY_SOCKET must not fail a migration."""
    with contextlib.suppress(OSError):
        sdnotify.notify(f"STATUS={text}")
