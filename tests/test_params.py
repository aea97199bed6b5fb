"""Migration parameters: ranges and the ones that may change while a job runs."""

from __future__ import annotations

import pytest

from zcmigrate.migrate.params import MigrationParameters, ParameterError


def test_defaults_follow_qemu() -> None:
    p = MigrationParameters()
    assert p.multifd_channels == 2 and p.downtime_limit == 300
    assert p.multifd_zerocopy is False and p.zero_page_detection is True
    assert p.to_dict()["multifd-channels"] == 2


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"multifd_channels": 0}, "multifd-channels"),
        ({"multifd_channels": 256}, "multifd-channels"),
        ({"max_bandwidth": -1}, "max-bandwidth"),
        ({"downtime_limit": 0}, "downtime-limit"),
        ({"pages_per_packet": 2048}, "pages per packet"),
        ({"in_flight_cap": 0}, "in-flight cap"),
    ],
)
def test_out_of_range_parameters_name_themselves(kw: dict[str, int], match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        MigrationParameters(**kw)  # type: ignore[arg-type]


def test_bandwidth_and_downtime_change_while_running_and_others_do_not() -> None:
    p = MigrationParameters()
    p.set("max-bandwidth", 1 << 20)
    p.set("downtime-limit", 50)
    assert (p.max_bandwidth, p.downtime_limit) == (1 << 20, 50)
    with pytest.raises(ParameterError, match="cannot change"):
        p.set("multifd-channels", 4)
    with pytest.raises(ParameterError):
        p.set("downtime-limit", 0)
    assert p.downtime_limit == 50  # a rejected change leaves the old value
