"""The command line: every option reads a ZCMIGRATE_ variable and shows its default; the
demo waits for its children against deadlines."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from zcmigrate.migrate.cli import main
from zcmigrate.migrate.cli.demo import Child


def commands() -> list[tuple[str, click.Command]]:
    """Every command, loaded: the group imports a command's module only when asked."""
    ctx = click.Context(main)
    out = []
    for name in main.list_commands(ctx):
        cmd = main.get_command(ctx, name)
        assert cmd is not None, name
        out.append((name, cmd))
    return out


@pytest.mark.parametrize(("name", "cmd"), commands())
def test_every_option_reads_an_environment_variable(name: str, cmd: click.Command) -> None:
    missing = [
        p.name for p in cmd.params
        if isinstance(p, click.Option) and p.name not in ("help",)
        and not (p.envvar and str(p.envvar).startswith("ZCMIGRATE_"))
    ]
    assert not missing, f"zcmigrate {name}: options without ZCMIGRATE_ variable: {missing}"


@pytest.mark.parametrize(("name", "cmd"), commands())
def test_help_shows_defaults_and_variables(name: str, cmd: click.Command) -> None:
    for p in cmd.params:
        has_default = p.default is not None and "UNSET" not in repr(p.default)
        if isinstance(p, click.Option) and not p.is_flag and has_default:
            assert p.show_default, f"zcmigrate {name} {p.opts[0]} hides its default"
        if isinstance(p, click.Option) and p.envvar:
            assert p.show_envvar, f"zcmigrate {name} {p.opts[0]} hides its variable"


def test_send_help_documents_exit_codes_and_the_qemu_names() -> None:
    out = CliRunner().invoke(main, ["send", "--help"], terminal_width=120).output
    for word in ("--multifd-channels", "--multifd-zerocopy", "--max-bandwidth",
                 "--downtime-limit", "--zero-page-detection", "ZCMIGRATE_MULTIFD_ZEROCOPY",
                 "Exit codes", "cannot converge"):
        assert word in out


def test_a_bad_destination_is_a_usage_error() -> None:
    r = CliRunner().invoke(main, ["send", "/nonexistent.img", "--to", "nohostport"])
    assert r.exit_code == 2 and "HOST:PORT" in r.output


def test_a_cipher_without_a_key_or_unknown_is_a_usage_error() -> None:
    """Without a key nothing is encrypted, so choosing a cipher is a mistake worth saying;
    a cipher zcmigrate does not offer is refused with the ones it does."""
    r = CliRunner().invoke(main, ["send", "/nonexistent.img", "--to", "127.0.0.1:1",
                                  "--cipher", "aes-128-gcm"])
    assert r.exit_code == 2 and "--cipher goes with --auth-key-file" in r.output
    r = CliRunner().invoke(main, ["send", "/nonexistent.img", "--to", "127.0.0.1:1",
                                  "--cipher", "rot13"])
    assert r.exit_code == 2 and "aes-128-ocb" in r.output and "aes-128-gcm" in r.output
    r = CliRunner().invoke(main, ["receive", "/nonexistent/dst.img", "--require-cipher",
                                  "aes-128-gcm"])
    assert r.exit_code == 2 and "--require-cipher goes with --auth-key-file" in r.output


def test_an_environment_variable_sets_an_option(tmp_path: object) -> None:
    r = CliRunner().invoke(main, ["send", "--help"],
                           env={"ZCMIGRATE_MULTIFD_CHANNELS": "7"}, terminal_width=120)
    assert r.exit_code == 0
    r = CliRunner().invoke(main, ["send", "x.img", "--to", "127.0.0.1:1"],
                           env={"ZCMIGRATE_MULTIFD_CHANNELS": "0"})
    assert r.exit_code == 2 and "multifd-channels" in r.output


# What `send` loads: its module, and the group's lookup of it, as `zcmigrate send` does.
_SEND_MODULES = """
import sys, click
import zcmigrate.migrate.cli.send
from zcmigrate.migrate.cli import main
assert main.get_command(click.Context(main), "send").name == "send"
print("\\n".join(sorted(sys.modules)))
"""

# Start-up is part of every migration's time (docs/performance.md): none of these may
# come with `send`. asyncio.base_events stands for asyncio actually loaded (the CLI
# keeps a deferred asyncio module in sys.modules).
NOT_FOR_SEND = (
    "pyroute2", "hypothesis", "asyncio.base_events", "ssl",
    "zcmigrate.migrate.check", "zcmigrate.migrate.destination", "zcmigrate.multifd.receiver",
    "zcmigrate.migrate.cli.check", "zcmigrate.migrate.cli.guest", "zcmigrate.migrate.cli.demo",
    "zcmigrate.migrate.cli.receive", "zcmigrate.migrate.cli.control",
)


def test_send_imports_nothing_it_does_not_run(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _SEND_MODULES], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    assert "zcmigrate.migrate.source" in loaded  # the test sees what send imports
    bad = sorted(m for m in loaded if any(m == n or m.startswith(n + ".")
                                          for n in NOT_FOR_SEND))
    assert not bad, f"send imports {bad}"


def test_the_demo_waits_for_a_child_line_no_longer_than_its_deadline(tmp_path: Path) -> None:
    """A child that stays alive but silent cannot hold the demo past its timeout."""
    child = Child(["receive", str(tmp_path / "x.img"), "--listen", "127.0.0.1:0"], tmp_path,
                  stderr=subprocess.DEVNULL)
    try:
        assert child.wait_line("listening:", timeout=60).startswith("listening: 127.0.0.1:")
        started = time.monotonic()
        with pytest.raises(click.ClickException, match="printed nothing of it in 1 s"):
            child.wait_line("never printed", timeout=1.0)
        assert time.monotonic() - started < 5
        assert child.proc.poll() is None  # it was silent, not gone
    finally:
        child.stop()


def test_the_demo_sees_a_child_exit_before_its_line(tmp_path: Path) -> None:
    child = Child(["--version"], tmp_path)
    try:
        with pytest.raises(click.ClickException, match="closed its output"):
            child.wait_line("never printed", timeout=60)
    finally:
        child.stop()
