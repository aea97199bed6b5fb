"""Migration parameters, named as QEMU and libvirt name them, with their checks.

The CLI and the service fill this; nothing below migrate/ reads it. It knows no sockets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from zcmigrate.channel.zcsocket import DEFAULT_PEER_TIMEOUT as DEFAULT_PEER_TIMEOUT
from zcmigrate.migrate.errors import ParameterError
from zcmigrate.migrate.memlock import DEFAULT_PAGES_PER_PACKET
from zcmigrate.multifd.wire import MAX_CHANNELS, MAX_PAGES_ALLOC

DEFAULT_CHANNELS = 2
DEFAULT_DOWNTIME_LIMIT_MS = 300  # QEMU's default
DEFAULT_MAX_ITERATIONS = 30
# Below 3 s keepalive probes would be sent every second and a busy host would look dead;
# above an hour nobody would call it detecting a dead peer.
DEFAULT_THROTTLE_INITIAL = 20  # QEMU's defaults
DEFAULT_THROTTLE_INCREMENT = 10
MIN_PEER_TIMEOUT = 3.0
MAX_PEER_TIMEOUT = 3600.0


@dataclass(slots=True)
class MigrationParameters:
    """One job's parameters. max_bandwidth and downtime_limit may change while it runs."""

    multifd_channels: int = DEFAULT_CHANNELS
    multifd_zerocopy: bool = False
    max_bandwidth: int = 0  # bytes per second; 0 = unlimited
    downtime_limit: int = DEFAULT_DOWNTIME_LIMIT_MS  # milliseconds
    zero_page_detection: bool = True  # QEMU's zero-page-detection=multifd; False = none
    pages_per_packet: int = DEFAULT_PAGES_PER_PACKET
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    timeout: float = 0.0  # seconds for the whole precopy phase; 0 = no limit
    in_flight_cap: int | None = None  # zero-copy bytes in flight per channel; None = automatic
    commit_timeout: float = 60.0  # seconds to wait for the destination's commit
    # Seconds within which a dead or silent peer is found: TCP keepalive and user
    # timeout, and the deadline of every wait for the other end.
    peer_timeout: float = DEFAULT_PEER_TIMEOUT
    # QEMU's auto-converge: throttle the guest harder each iteration that does not converge.
    auto_converge: bool = False
    throttle_initial: int = DEFAULT_THROTTLE_INITIAL  # percent, QEMU's cpu-throttle-initial
    throttle_increment: int = DEFAULT_THROTTLE_INCREMENT  # cpu-throttle-increment

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if not 1 <= self.multifd_channels <= MAX_CHANNELS:
            raise ParameterError(
                f"multifd-channels must be 1..{MAX_CHANNELS}, not {self.multifd_channels}"
            )
        if self.max_bandwidth < 0:
            raise ParameterError("max-bandwidth must be >= 0 (0 means unlimited)")
        if self.downtime_limit < 1:
            raise ParameterError("downtime-limit must be at least 1 ms")
        if not 1 <= self.pages_per_packet <= MAX_PAGES_ALLOC:
            raise ParameterError(f"pages per packet must be 1..{MAX_PAGES_ALLOC}")
        if self.max_iterations < 1:
            raise ParameterError("max-iterations must be at least 1")
        if self.timeout < 0 or self.commit_timeout <= 0:
            raise ParameterError("timeouts must be positive (timeout 0 means none)")
        for name, value in (("throttle-initial", self.throttle_initial),
                            ("throttle-increment", self.throttle_increment)):
            if not 1 <= value <= 99:
                raise ParameterError(f"{name} must be 1..99 percent, not {value}")
        if not MIN_PEER_TIMEOUT <= self.peer_timeout <= MAX_PEER_TIMEOUT:
            raise ParameterError(f"peer-timeout must be {MIN_PEER_TIMEOUT:g}.."
                                 f"{MAX_PEER_TIMEOUT:g} seconds, not {self.peer_timeout:g}")
        if self.in_flight_cap is not None and self.in_flight_cap <= 0:
            raise ParameterError("in-flight cap must be a positive number of bytes")

    def set(self, name: str, value: Any) -> None:
        """Change a parameter that may change while a migration runs."""
        if name not in ("max-bandwidth", "downtime-limit"):
            raise ParameterError(f"{name} cannot change during a migration "
                                 "(only max-bandwidth and downtime-limit can)")
        attr = name.replace("-", "_")
        old = getattr(self, attr)
        setattr(self, attr, int(value))
        try:
            self.check()
        except ParameterError:
            setattr(self, attr, old)
            raise

    def to_dict(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}
