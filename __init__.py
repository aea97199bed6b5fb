"""zcmigrate: live migration of a running workload's memory over multifd channels with
MSG_ZEROCOPY, QEMU's multifd migration as a standalone daemon.

The package's layers are its subpackages, each importing only those below it:
`zcmigrate.migrate` (the job, the CLI, the guest stand-in), `zcmigrate.multifd` (pages
and packets), `zcmigrate.channel` (bytes on a socket) and `zcmigrate.native` (C through
cffi). This module imports none of them, so `import zcmigrate` costs nothing.
"""


class ZcmigrateError(Exception):
    """The root of every error zcmigrate raises on purpose.

    Each layer has its own branch under it (channel.errors, multifd's ProtocolError and
    MultifdError, migrate.errors); `exit_code` is what the command line exits with when
    this error ends a command, so the mapping lives with the error, not in the CLI.
    """

    exit_code: int = 1


__all__ = ["ZcmigrateError"]
