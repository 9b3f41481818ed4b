"""Typed settings of the ingest path.

The daemon parses and validates config.toml into these (daemon/config.py); ingest never reads files
of its own, so that tests, benchmarks and the daemon build it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ingest.protocol import Limits
from ingest.security import CurveConfig, RateLimit
from ingest.windowing import IMAGE_ROLES, ROLES, WindowSpec

ROLE_KIND = {role: ("img" if role in IMAGE_ROLES else "rad") for role in ROLES}


@dataclass(frozen=True)
class GroupSettings:
    """One sensor group: the unit that is windowed and fused together."""

    name: str
    sensors: dict[str, str]  # sensor name -> role (image_a, image_b, seq_a, seq_b)
    window: WindowSpec
    offsets_ns: dict[str, int] = field(default_factory=dict)  # static clock correction per sensor

    def __post_init__(self) -> None:
        roles = list(self.sensors.values())
        for sensor, role in self.sensors.items():
            if role not in ROLES:
                raise ValueError(f"group {self.name!r}: sensor {sensor!r} has unknown role {role!r}; roles: {ROLES}")
        dup = {r for r in roles if roles.count(r) > 1}
        if dup:
            raise ValueError(f"group {self.name!r}: role(s) {sorted(dup)} assigned to more than one sensor")
        unknown = set(self.offsets_ns) - set(self.sensors)
        if unknown:
            raise ValueError(f"group {self.name!r}: clock offsets for unknown sensors {sorted(unknown)}")


@dataclass(frozen=True)
class IngestSettings:
    endpoints: tuple[str, ...]
    groups: dict[str, GroupSettings]
    bind: bool = False  # False: connect to publishers that bind; True: bind and let publishers connect
    transport: str = "sub"  # "sub" (live PUB/SUB) or "pull" (lossless PUSH/PULL, for replay)
    limits: Limits = Limits()
    rcvhwm: int = 10000
    dead_letter_path: Path | None = None
    dead_letter_max_bytes: int = 256 * 2**20
    reject_log_interval_s: float = 10.0
    skew_window_s: float = 60.0
    advance_interval_s: float = 0.05  # how often idle and max_wait timers are checked (live)
    # live groups: data whose event time (after clock_offset_ms) is further ahead of its receive time than
    # this is refused as future_time, since it would move the watermark and close windows early; 0 = off
    max_future_ns: int = 0
    curve: CurveConfig | None = None  # CURVE on the input socket(s); None = plain (ingest/security.py)
    rate_limits: dict[str, RateLimit] = field(default_factory=dict)  # "group/sensor" -> token bucket

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("ingest needs at least one endpoint")
        if self.transport not in ("sub", "pull"):
            raise ValueError(f"transport must be 'sub' or 'pull', not {self.transport!r}")
        if not self.groups:
            raise ValueError("ingest needs at least one sensor group")
