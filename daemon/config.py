"""config.toml -> typed settings, with errors that name the offending key.

A long-running service must refuse a bad config at start, loudly and precisely, rather than run for a
week on a typo: unknown keys, wrong types and out-of-range values are all errors here. The schema
below is the single list of keys; config.toml at the repository root documents each one.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingest.protocol import NAME_RE, Limits
from ingest.settings import GroupSettings, IngestSettings
from ingest.windowing import ROLES, WindowSpec


class ConfigError(ValueError):
    """A config problem; the message names the file and the key."""


@dataclass(frozen=True)
class Key:
    kind: type | tuple[type, ...]
    default: Any
    check: Any = None  # callable(value) -> error text or None
    allowed: tuple = ()


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


NUM = (int, float)

INGEST = {
    "mode": Key(str, "live", allowed=("live", "replay")),
    "endpoints": Key(list, ["tcp://127.0.0.1:5555"]),
    "bind": Key(bool, False),
    "max_message_bytes": Key(int, 64 * 2**20, _positive),
    "max_image_side": Key(int, 16384, _positive),
    "non_finite": Key(str, "reject", allowed=("reject", "keep")),
    "rcvhwm": Key(int, 10000, _non_negative),
    "dead_letter": Key(str, ""),
    "dead_letter_max_bytes": Key(int, 256 * 2**20, _non_negative),
    "reject_log_interval_s": Key(NUM, 10.0, _non_negative),
    "skew_window_s": Key(NUM, 60.0, _positive),
}
WINDOW = {
    "size_ms": Key(NUM, 1000, _positive),
    "hop_ms": Key(NUM, 0, _non_negative),
    "allowed_lateness_ms": Key(NUM, 200, _non_negative),
    "idle_timeout_ms": Key(NUM, 2000, _positive),
    "max_wait_ms": Key(NUM, 1000, _non_negative),
    "missing_policy": Key(str, "emit", allowed=("emit", "drop")),
    "min_roles": Key(int, 1, lambda v: None if 1 <= v <= len(ROLES) else f"must be in 1..{len(ROLES)}"),
    "required_roles": Key(list, []),
    "max_open_windows": Key(int, 64, _positive),
    "max_buffered_bytes": Key(int, 256 * 2**20, _positive),
}
GROUP = {
    "sensors": Key(dict, None),
    "clock_offset_ms": Key(dict, {}),
    "window": Key(dict, {}),
}
LOGGING = {
    "level": Key(str, "info", allowed=("debug", "info", "warning", "error")),
    "format": Key(str, "auto", allowed=("auto", "json", "console")),
}
TOP = {"ingest": INGEST, "window": WINDOW, "groups": None, "logging": LOGGING}


@dataclass(frozen=True)
class Config:
    ingest: IngestSettings
    log_level: str
    log_format: str
    source: str


def _section(raw: Any, schema: dict[str, Key], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = set(raw) - set(schema)
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (known: {', '.join(schema)})")
    out = {}
    for name, key in schema.items():
        if name not in raw:
            if key.default is None:
                raise ConfigError(f"{where}.{name}: required key is missing")
            out[name] = key.default
            continue
        value = raw[name]
        kinds = key.kind if isinstance(key.kind, tuple) else (key.kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{where}.{name}: expected {names}, got {type(value).__name__} {value!r}")
        if key.allowed and value not in key.allowed:
            raise ConfigError(f"{where}.{name}: {value!r} is not one of {list(key.allowed)}")
        if key.check and (msg := key.check(value)):
            raise ConfigError(f"{where}.{name}: {msg} (got {value!r})")
        out[name] = value
    return out


def _ms(v: float) -> int:
    return int(round(v * 1e6))


def _window(raw: dict[str, Any], where: str, mode: str) -> WindowSpec:
    for role in raw["required_roles"]:
        if role not in ROLES:
            raise ConfigError(f"{where}.required_roles: {role!r} is not a role ({', '.join(ROLES)})")
    size, hop = _ms(raw["size_ms"]), _ms(raw["hop_ms"])
    if hop and size % hop:
        raise ConfigError(f"{where}.size_ms: must be a multiple of hop_ms ({raw['hop_ms']})")
    try:
        return WindowSpec(
            size_ns=size,
            hop_ns=hop or None,
            allowed_lateness_ns=_ms(raw["allowed_lateness_ms"]),
            idle_timeout_ns=_ms(raw["idle_timeout_ms"]),
            max_wait_ns=_ms(raw["max_wait_ms"]) if mode == "live" else 0,
            mode=mode,
            missing_policy=raw["missing_policy"],
            min_roles=raw["min_roles"],
            required_roles=tuple(raw["required_roles"]),
            max_open_windows=raw["max_open_windows"],
            max_buffered_bytes=raw["max_buffered_bytes"],
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _group(name: str, raw: Any, window_defaults: dict[str, Any], mode: str) -> GroupSettings:
    where = f"groups.{name}"
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}: group name must match [A-Za-z0-9_.-]{{1,64}}")
    g = _section(raw, GROUP, where)
    sensors = g["sensors"]
    if not sensors:
        raise ConfigError(f"{where}.sensors: a group needs at least one sensor")
    for sensor, role in sensors.items():
        if not NAME_RE.match(sensor):
            raise ConfigError(f"{where}.sensors.{sensor}: sensor name must match [A-Za-z0-9_.-]{{1,64}}")
        if role not in ROLES:
            raise ConfigError(f"{where}.sensors.{sensor}: role {role!r} is not one of {', '.join(ROLES)}")
    offsets = {}
    for sensor, ms in g["clock_offset_ms"].items():
        if sensor not in sensors:
            raise ConfigError(f"{where}.clock_offset_ms.{sensor}: not a sensor of this group")
        if isinstance(ms, bool) or not isinstance(ms, NUM):
            raise ConfigError(f"{where}.clock_offset_ms.{sensor}: expected a number of milliseconds")
        offsets[sensor] = _ms(ms)
    win = _section({**window_defaults, **g["window"]}, WINDOW, f"{where}.window")
    try:
        return GroupSettings(name, dict(sensors), _window(win, f"{where}.window", mode), offsets)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def parse(raw: dict[str, Any], source: str = "<config>") -> Config:
    unknown = set(raw) - set(TOP)
    if unknown:
        raise ConfigError(f"{source}: unknown section [{sorted(unknown)[0]}] (known: {', '.join(TOP)})")
    ing = _section(raw.get("ingest", {}), INGEST, "ingest")
    mode = ing["mode"]
    for ep in ing["endpoints"]:
        if not isinstance(ep, str) or "://" not in ep:
            raise ConfigError(f"ingest.endpoints: {ep!r} is not a ZeroMQ endpoint like tcp://host:port or ipc:///path")
    if not ing["endpoints"]:
        raise ConfigError("ingest.endpoints: at least one endpoint is needed")
    window_raw = raw.get("window", {})
    _section(window_raw, WINDOW, "window")  # validates the defaults table on its own too
    groups_raw = raw.get("groups")
    if not isinstance(groups_raw, dict) or not groups_raw:
        raise ConfigError(f"{source}: at least one [groups.NAME] table is required")
    groups = {name: _group(name, g, window_raw, mode) for name, g in groups_raw.items()}
    limits = Limits(
        max_message_bytes=ing["max_message_bytes"],
        reject_non_finite=ing["non_finite"] == "reject",
        max_image_side=ing["max_image_side"],
    )
    settings = IngestSettings(
        endpoints=tuple(ing["endpoints"]),
        groups=groups,
        bind=ing["bind"],
        transport="sub" if mode == "live" else "pull",
        limits=limits,
        rcvhwm=ing["rcvhwm"],
        dead_letter_path=Path(ing["dead_letter"]) if ing["dead_letter"] else None,
        dead_letter_max_bytes=ing["dead_letter_max_bytes"],
        reject_log_interval_s=float(ing["reject_log_interval_s"]),
        skew_window_s=float(ing["skew_window_s"]),
    )
    logging = _section(raw.get("logging", {}), LOGGING, "logging")
    return Config(settings, logging["level"], logging["format"], source)


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse(raw, str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
