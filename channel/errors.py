"""The errors a channel raises, each with a message that says what to do about it.

Shared by the channel modules; it knows nothing of pages or migrations.
"""

from __future__ import annotations

from zcmigrate import ZcmigrateError


class ChannelError(ZcmigrateError):
    """A channel operation failed; the channel is no longer usable."""


class ChannelClosed(ChannelError):
    """The channel was shut down locally, or the peer closed the connection."""


class AcceptTimeout(ChannelError):
    """No connection arrived on a listener within the time asked for."""


class ZeroCopyUnsupported(ChannelError):
    """Zero copy was asked for on a channel that does not have the feature."""


class ZeroCopyLimitError(ChannelError):
    """MSG_ZEROCOPY kept failing with ENOBUFS: the locked-memory or optmem budget is spent."""


class FlushTimeout(ChannelError):
    """flush() gave up waiting for zero-copy completions."""


class ReadTimeout(ChannelError):
    """A read with a deadline did not get its bytes in time."""


class AeadError(ChannelError):
    """A seal or open could not be done: bad arguments, bytes outside a mapping, or
    libcrypto failed. The stream it belongs to is no longer usable."""


class AuthenticationFailed(AeadError):
    """A sealed record or packet did not verify: tampered with, sealed under another key
    or for another stream. Its buffer holds zeros, never unverified plaintext."""


class OutOfOrder(AeadError):
    """A sealed packet came with a counter other than the next one expected: a replay,
    a reordering or a loss."""


class NonceExhausted(AeadError):
    """A key has sealed under every counter it has: it seals nothing more."""


class SendBufferTimeout(ChannelError):
    """No send buffer came free in time: zero-copy completions are not arriving."""


ENOBUFS_REMEDY = (
    "zero-copy send failed with ENOBUFS twice (after draining the error queue): "
    "the kernel could not pin more pages for this user. Raise the locked-memory limit "
    "(LimitMEMLOCK= in the unit, or `ulimit -l`), grant CAP_IPC_LOCK, set an in-flight cap "
    "below the limit, or set multifd-zerocopy off"
)
