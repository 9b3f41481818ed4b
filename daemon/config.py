"""config.toml -> typed settings, with errors that name the offending key.

A long-running service must refuse a bad config at start, loudly and precisely, rather than run for a
week on a typo: unknown keys, wrong types and out-of-range values are all errors here. The schema
below is the single list of keys; config.toml at the repository root documents each one.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.admin import ADMIN_PATHS, parse_listen
from ingest import security
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


def _socket_queue(v: int) -> str | None:  # a ZeroMQ high-water mark: a C int, and 0 would mean unlimited
    return None if 1 <= v <= 2**31 - 1 else "must be in 1..2147483647 (0 would mean an unbounded queue)"


NUM = (int, float)

INGEST = {
    "mode": Key(str, "live", allowed=("live", "replay")),
    "endpoints": Key(list, ["tcp://127.0.0.1:5555"]),
    "bind": Key(bool, False),
    "max_message_bytes": Key(int, 64 * 2**20, lambda v: None if 0 < v < 2**62 else "must be in 1..2**62"),
    "max_image_side": Key(int, 16384, _positive),
    "non_finite": Key(str, "reject", allowed=("reject", "keep")),
    "rcvhwm": Key(int, 10000, _socket_queue),
    "dead_letter": Key(str, ""),
    "dead_letter_max_bytes": Key(int, 256 * 2**20, _non_negative),
    "reject_log_interval_s": Key(NUM, 10.0, _non_negative),
    "skew_window_s": Key(NUM, 60.0, _positive),
    "max_future_ms": Key(NUM, 10000, _non_negative),
}
WINDOW = {
    # at most a day: the model's resampling bins a window in int64 ns arithmetic (width x length < 2**62)
    "size_ms": Key(NUM, 1000, lambda v: None if 0 < v <= 86_400_000 else "must be in (0, 86400000] (one day)"),
    "hop_ms": Key(NUM, 0, _non_negative),
    "allowed_lateness_ms": Key(NUM, 200, _non_negative),
    "idle_timeout_ms": Key(NUM, 2000, _positive),
    "max_wait_ms": Key(NUM, 1000, lambda v: None if v == 0 or v >= 1e-6 else "must be 0 (off) or at least 1e-6 (1 ns)"),
    "missing_policy": Key(str, "emit", allowed=("emit", "drop")),
    "min_roles": Key(int, 1, lambda v: None if 1 <= v <= len(ROLES) else f"must be in 1..{len(ROLES)}"),
    "required_roles": Key(list, []),
    "max_open_windows": Key(int, 64, _positive),
    "max_buffered_bytes": Key(int, 256 * 2**20, _positive),
    "late_policy": Key(str, "sink", allowed=("sink", "update")),
    "update_horizon_ms": Key(NUM, 5000, _positive),
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


ENDPOINT_TRANSPORTS = ("tcp", "ipc", "inproc", "pgm", "epgm", "ws", "wss")


def endpoint_error(ep: Any) -> str | None:
    """Why ``ep`` is not a ZeroMQ endpoint libzmq would take, or None: checked here, since serve only
    finds out in its ingest process, after loading the model."""
    if not isinstance(ep, str) or "://" not in ep:
        return "is not a ZeroMQ endpoint like tcp://host:port, ipc:///path or inproc://name"
    transport, _, address = ep.partition("://")
    if transport not in ENDPOINT_TRANSPORTS:
        return f"has an unknown transport {transport!r} (one of {', '.join(ENDPOINT_TRANSPORTS)})"
    if not address:
        return "has no address after ://"
    if transport == "tcp":
        host, sep, port = address.rpartition(":")
        if not sep or not host or not (port == "*" or (port.isdigit() and 0 <= int(port) < 65536)):
            return "needs tcp://host:port with a port in 0..65535 (* or 0: bind any free port)"
    return None


def _endpoint_or_empty(v: str) -> str | None:
    if v == "":
        return None
    error = endpoint_error(v)
    return None if error is None else f'{error}, or "" for none'


def _device(v: str) -> str | None:
    ok = v in ("cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit() and v[5:].isascii())
    return None if ok else 'must be "cpu", "cuda" or "cuda:N"'


def _buckets(v: list) -> str | None:
    if not v:
        return "needs at least one bucket edge"
    if any(isinstance(b, bool) or not isinstance(b, int | float) or not 0 < b < math.inf for b in v):
        return "must be a list of positive, finite numbers of seconds"
    return None


def _listen(v: str) -> str | None:
    try:
        parse_listen(v)
    except ValueError as exc:
        return str(exc)
    return None


MODEL = {
    "checkpoint": Key(str, "model/weights/default.pt", lambda v: None if v else "must not be empty"),
    "device": Key(str, "cpu", _device),
    "torch_threads": Key(int, 0, lambda v: None if 0 <= v <= 1024 else "must be in 0..1024 (0: automatic)"),
    "det_threshold": Key(NUM, 0.3, lambda v: None if 0 <= v <= 1 else "must be in [0, 1]"),
    "det_max_detections": Key(int, 50, _positive),
    "resample": Key(str, "mean", allowed=("mean", "linear")),
    "sha256": Key(str, "", lambda v: None if v == "" or _is_sha256(v) else 'must be 64 hex digits, or ""'),
}
INFERENCE = {
    "max_batch_size": Key(int, 8, _positive),
    "max_delay_ms": Key(NUM, 50, _non_negative),
    "queue_size": Key(int, 64, _positive),
    "policy": Key(str, "auto", allowed=("auto", "drop_oldest", "block")),
    "latency_buckets_s": Key(list, [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0], _buckets),
    "prepare_in": Key(str, "ingest", allowed=("ingest", "main")),
}
SINKS = {
    "zmq_endpoint": Key(str, "tcp://127.0.0.1:5556", _endpoint_or_empty),
    "zmq_bind": Key(bool, True),
    "zmq_sndhwm": Key(int, 1000, _socket_queue),
    "jsonl_path": Key(str, ""),
    "jsonl_max_bytes": Key(int, 64 * 2**20, _positive),
    "jsonl_backups": Key(int, 5, _non_negative),
    "fsync": Key(str, "rotate", allowed=("always", "rotate", "never")),
    "late_path": Key(str, ""),
    "mcap_path": Key(str, ""),
    "mcap_inputs": Key(bool, True),
    "png_dir": Key(str, ""),
    "png_max_per_s": Key(NUM, 1.0, _positive),
    "png_keep_windows": Key(int, 3600, lambda v: None if 0 <= v < 2**31 else "must be in 0..2^31-1"),
    "queue_size": Key(int, 1024, _positive),
}
ADMIN = {
    "listen": Key(str, "127.0.0.1:9102", _listen),
    "token": Key(str, "", lambda v: _token(v)),
    # the ingest process reports every 0.5 s: a shorter limit would flap on a healthy daemon
    "health_max_age_s": Key(NUM, 10.0, lambda v: None if v >= 1.0 else "must be >= 1 (seconds)"),
    "public_endpoints": Key(list, ["/healthz"], lambda v: _public_endpoints(v)),
}
SHUTDOWN = {
    "timeout_s": Key(NUM, 30.0, lambda v: None if 0 < v <= 86400 else "must be in (0, 86400] seconds"),
}
FUSION_METHODS = ("none", "mean", "cddfuse", "crossfuse", "cmmdl")
IMAGE_FUSION = {
    "method": Key(str, "none", allowed=FUSION_METHODS),
    "checkpoint": Key(str, ""),
    "feed": Key(str, "image_a", allowed=("image_a", "none")),
    "tile": Key(int, 0, _non_negative),
    "overlap": Key(int, -1, lambda v: None if v >= -1 else "must be >= 0, or -1 for the method's default"),
    "device": Key(str, "cpu", _device),
}
SECURITY = {
    "curve": Key(bool, False),
    "secret_key": Key(str, ""),
    "authorized_sensors": Key(str, ""),
    "sensor_server_keys": Key(dict, {}),
    "authorized_readers": Key(str, ""),
    "results_server_key": Key(str, ""),
    "allow_ips": Key(list, []),
    "deny_ips": Key(list, []),
    "sensor_groups": Key(dict, {}),
    "log_interval_s": Key(NUM, 10.0, _non_negative),
}
RATE = {
    "messages_per_s": Key(NUM, 0, _non_negative),
    "bytes_per_s": Key(NUM, 0, _non_negative),
    "burst_s": Key(NUM, 1.0, _positive),
}
RATE_LIMIT = {**RATE, "groups": Key(dict, {}), "sensors": Key(dict, {})}
TOP = {
    "ingest": INGEST,
    "window": WINDOW,
    "groups": None,
    "logging": LOGGING,
    "model": MODEL,
    "inference": INFERENCE,
    "sinks": SINKS,
    "admin": ADMIN,
    "shutdown": SHUTDOWN,
    "image_fusion": IMAGE_FUSION,
    "security": SECURITY,
    "rate_limit": RATE_LIMIT,
}


@dataclass(frozen=True)
class ModelSettings:
    """[model]: which checkpoint is served and how it runs."""

    checkpoint: Path = Path("model/weights/default.pt")  # relative paths: against the working directory
    device: str = "cpu"
    torch_threads: int = 0  # 0: automatic (cores - 1, at least 1)
    det_threshold: float = 0.3
    det_max_detections: int = 50
    resample: str = "mean"
    sha256: str = ""  # expected sha256 of the checkpoint file; "" = not pinned


@dataclass(frozen=True)
class InferenceSettings:
    """[inference]: micro-batching and the bounded queue in front of the model."""

    max_batch_size: int = 8
    max_delay_s: float = 0.05
    queue_size: int = 64
    policy: str = "drop_oldest"  # resolved: "auto" follows the ingest mode (live -> drop_oldest)
    latency_buckets_s: tuple[float, ...] = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    prepare_in: str = "ingest"  # where the model's preprocessing runs: "ingest" (its own process) or "main"


@dataclass(frozen=True)
class SinkSettings:
    """[sinks]: where results and late records go; None disables an output."""

    zmq_endpoint: str | None = "tcp://127.0.0.1:5556"
    zmq_bind: bool = True
    zmq_sndhwm: int = 1000
    jsonl_path: Path | None = None
    jsonl_max_bytes: int = 64 * 2**20
    jsonl_backups: int = 5
    fsync: str = "rotate"
    late_path: Path | None = None
    mcap_path: Path | None = None
    mcap_inputs: bool = True  # record every valid input message in the MCAP file too
    png_dir: Path | None = None  # pictures of detections, heatmaps and fusion weights
    png_max_per_s: float = 1.0  # per group
    png_keep_windows: int = 3600  # newest windows whose pictures are kept; 0 = all
    queue_size: int = 1024
    zmq_curve: security.CurveConfig | None = None  # CURVE on the results socket ([security])


@dataclass(frozen=True)
class AdminSettings:
    """[admin]: the HTTP endpoint for metrics, health, readiness and reload."""

    host: str = "127.0.0.1"
    port: int = 9102
    token: str = ""
    health_max_age_s: float = 10.0
    public_endpoints: tuple[str, ...] = ("/healthz",)  # served without the token (with one set: loopback too)


@dataclass(frozen=True)
class ImageFusionSettings:
    """[image_fusion]: optional pixel-level IR/visible fusion of each window's frames (daemon/fusion_stage.py)."""

    method: str = "none"  # none | mean | cddfuse | crossfuse | cmmdl
    checkpoint: str = ""  # the network's weights (file or folder); not used by mean
    feed: str = "image_a"  # image_a: the fused frame replaces Image-A for the model; none: quality gauges only
    tile: int = 0  # tile side in px, 0 = whole frame
    overlap: int = -1  # tile overlap in px, -1 = the method's default
    device: str = "cpu"


@dataclass(frozen=True)
class Config:
    ingest: IngestSettings
    log_level: str
    log_format: str
    source: str
    model: ModelSettings = field(default_factory=ModelSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    sinks: SinkSettings = field(default_factory=SinkSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    shutdown_timeout_s: float = 30.0
    image_fusion: ImageFusionSettings = field(default_factory=ImageFusionSettings)


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
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}.{name}: must be a finite number (got {value!r})")
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
    # Windows open at once: those from the newest data back over size + lateness (live: max_wait closes
    # them sooner). Fewer allowed and every window overflows: dropped, and the data after it late.
    lateness, wait = _ms(raw["allowed_lateness_ms"]), _ms(raw["max_wait_ms"]) if mode == "live" else 0
    held = min(lateness, wait) if wait else lateness
    need = -(-(size + held) // (hop or size)) + 1
    if size > 0 and raw["max_open_windows"] < need:
        raise ConfigError(
            f"{where}.max_open_windows: {raw['max_open_windows']} cannot hold the windows open at once with "
            f"size_ms {raw['size_ms']:g}, hop_ms {raw['hop_ms']:g} and allowed_lateness_ms "
            f"{raw['allowed_lateness_ms']:g}{' (max_wait_ms ' + format(raw['max_wait_ms'], 'g') + ')' if wait else ''}"
            f": at least {need}, or every window would overflow"
        )
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
            late_policy=raw["late_policy"],
            update_horizon_ns=_ms(raw["update_horizon_ms"]),
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
        if isinstance(ms, bool) or not isinstance(ms, NUM) or not math.isfinite(ms):
            raise ConfigError(f"{where}.clock_offset_ms.{sensor}: expected a finite number of milliseconds")
        offsets[sensor] = _ms(ms)
    win = _section({**window_defaults, **g["window"]}, WINDOW, f"{where}.window")
    roles = set(sensors.values())
    if win["min_roles"] > len(roles):
        raise ConfigError(
            f"{where}.window.min_roles: {win['min_roles']} exceeds the group's {len(roles)} configured role(s): "
            "every window would be dropped"
        )
    absent = [r for r in win["required_roles"] if r in ROLES and r not in roles]
    if absent:
        raise ConfigError(
            f"{where}.window.required_roles: {absent[0]!r} has no sensor in this group: every window would be dropped"
        )
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
        if (error := endpoint_error(ep)) is not None:
            raise ConfigError(f"ingest.endpoints: {ep!r} {error}")
    if not ing["endpoints"]:
        raise ConfigError("ingest.endpoints: at least one endpoint is needed")
    window_raw = raw.get("window", {})
    _section(window_raw, WINDOW, "window")  # validates the defaults table on its own too
    groups_raw = raw.get("groups")
    if not isinstance(groups_raw, dict) or not groups_raw:
        raise ConfigError(f"{source}: at least one [groups.NAME] table is required")
    groups = {name: _group(name, g, window_raw, mode) for name, g in groups_raw.items()}
    for name, g in groups.items():  # a window that cannot hold one message overflows on every message
        if g.window.max_buffered_bytes < ing["max_message_bytes"]:
            raise ConfigError(
                f"groups.{name}: window max_buffered_bytes ({g.window.max_buffered_bytes}) is below [ingest] "
                f"max_message_bytes ({ing['max_message_bytes']}): a message that size could never be windowed; "
                "raise it, or lower max_message_bytes to the largest message your sensors send"
            )
    limits = Limits(
        max_message_bytes=ing["max_message_bytes"],
        reject_non_finite=ing["non_finite"] == "reject",
        max_image_side=ing["max_image_side"],
    )
    sinks_raw = _section(raw.get("sinks", {}), SINKS, "sinks")
    ingest_curve, results_curve = _security(
        _section(raw.get("security", {}), SECURITY, "security"), ing, groups, sinks_raw
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
        max_future_ns=int(ing["max_future_ms"] * 1_000_000),
        curve=ingest_curve,
        rate_limits=_rate_limits(_section(raw.get("rate_limit", {}), RATE_LIMIT, "rate_limit"), groups),
    )
    logging = _section(raw.get("logging", {}), LOGGING, "logging")
    return Config(
        settings,
        logging["level"],
        logging["format"],
        source,
        model=_model(_section(raw.get("model", {}), MODEL, "model")),
        inference=_inference(_section(raw.get("inference", {}), INFERENCE, "inference"), mode),
        sinks=_sinks(sinks_raw, results_curve, ing["dead_letter"]),
        admin=_admin(_section(raw.get("admin", {}), ADMIN, "admin")),
        shutdown_timeout_s=float(_section(raw.get("shutdown", {}), SHUTDOWN, "shutdown")["timeout_s"]),
        image_fusion=_image_fusion(_section(raw.get("image_fusion", {}), IMAGE_FUSION, "image_fusion")),
    )


def _path_or_none(v: str) -> Path | None:
    return Path(v) if v else None


def _model(m: dict[str, Any]) -> ModelSettings:
    return ModelSettings(
        checkpoint=Path(m["checkpoint"]),
        device=m["device"],
        torch_threads=m["torch_threads"],
        det_threshold=float(m["det_threshold"]),
        det_max_detections=m["det_max_detections"],
        resample=m["resample"],
        sha256=m["sha256"].lower(),
    )


def _inference(i: dict[str, Any], mode: str) -> InferenceSettings:
    if i["queue_size"] < i["max_batch_size"]:
        raise ConfigError(f"inference.queue_size: must be >= max_batch_size ({i['max_batch_size']})")
    policy = i["policy"]
    if policy == "auto":  # live sheds load (freshness wins); replay must be lossless
        policy = "drop_oldest" if mode == "live" else "block"
    return InferenceSettings(
        max_batch_size=i["max_batch_size"],
        max_delay_s=i["max_delay_ms"] / 1000.0,
        queue_size=i["queue_size"],
        policy=policy,
        latency_buckets_s=tuple(sorted(float(b) for b in i["latency_buckets_s"])),
        prepare_in=i["prepare_in"],
    )


def _check_sink_files(s: dict[str, Any], dead_letter: str = "") -> None:
    """No two writers may share a file (rotated backups included): each sink counts only its own
    bytes, so a shared file grows past its limit and one sink's cleanup after a failed write would cut
    away the other's records; the dead-letter file's msgpack records would make a JSONL file unreadable."""
    from sinks.jsonl import rotated_paths

    claimed: dict[str, str] = {}
    paths = {f"sinks.{key}": s[key] for key in ("jsonl_path", "late_path", "mcap_path", "png_dir")}
    paths["ingest.dead_letter"] = dead_letter
    for key, value in paths.items():
        if not value:
            continue
        rotated = key in ("sinks.jsonl_path", "sinks.late_path")
        for f in rotated_paths(Path(value), s["jsonl_backups"]) if rotated else [Path(value)]:
            name = os.path.abspath(f)
            if name in claimed:
                raise ConfigError(
                    f"{key} = {value!r}: the file {f} is also written by {claimed[name]} "
                    "(rotated backups included); give each its own"
                )
            claimed[name] = key


def _sinks(s: dict[str, Any], curve: security.CurveConfig | None = None, dead_letter: str = "") -> SinkSettings:
    _check_sink_files(s, dead_letter)
    return SinkSettings(
        zmq_endpoint=s["zmq_endpoint"] or None,
        zmq_bind=s["zmq_bind"],
        zmq_sndhwm=s["zmq_sndhwm"],
        jsonl_path=_path_or_none(s["jsonl_path"]),
        jsonl_max_bytes=s["jsonl_max_bytes"],
        jsonl_backups=s["jsonl_backups"],
        fsync=s["fsync"],
        late_path=_path_or_none(s["late_path"]),
        mcap_path=_path_or_none(s["mcap_path"]),
        mcap_inputs=s["mcap_inputs"],
        png_dir=_path_or_none(s["png_dir"]),
        png_max_per_s=float(s["png_max_per_s"]),
        png_keep_windows=s["png_keep_windows"],
        queue_size=s["queue_size"],
        zmq_curve=curve,
    )


def _admin(a: dict[str, Any]) -> AdminSettings:
    host, port = parse_listen(a["listen"])
    return AdminSettings(
        host=host,
        port=port,
        token=a["token"],
        health_max_age_s=float(a["health_max_age_s"]),
        public_endpoints=tuple(a["public_endpoints"]),
    )


def _image_fusion(f: dict[str, Any]) -> ImageFusionSettings:
    network = f["method"] not in ("none", "mean")
    if network and not f["checkpoint"]:
        raise ConfigError(f"image_fusion.checkpoint: method {f['method']!r} needs its weights (a file or folder)")
    if network and not Path(f["checkpoint"]).exists():
        raise ConfigError(f"image_fusion.checkpoint: {f['checkpoint']} does not exist")
    if f["tile"] and f["overlap"] >= f["tile"]:
        raise ConfigError(f"image_fusion.overlap: must be smaller than tile ({f['tile']})")
    if f["tile"] and network:  # the method's own limits (loads torch: only when a network is configured)
        from model.fusion import METHODS

        m = METHODS[f["method"]]
        if f["tile"] < m.min_side:
            raise ConfigError(f"image_fusion.tile: {f['method']} needs tiles of at least {m.min_side} px")
        if f["overlap"] < 0 and m.overlap >= f["tile"]:
            raise ConfigError(
                f"image_fusion.tile: must exceed {f['method']}'s default overlap ({m.overlap} px), or set overlap"
            )
    return ImageFusionSettings(**f)


def _token(v: str) -> str | None:
    """A token a client can send: HTTP headers are latin-1 and the presented value is stripped."""
    if v and not (v.isascii() and v.isprintable() and v == v.strip()):
        return "must be printable ASCII without leading or trailing spaces (a client could never match it)"
    return None


def _is_sha256(v: str) -> bool:
    return len(v) == 64 and all(c in "0123456789abcdefABCDEF" for c in v)


def _public_endpoints(v: list) -> str | None:
    bad = [p for p in v if p not in ADMIN_PATHS or p == "/reload"]
    return f"{bad[0]!r} cannot be public (choose among /healthz, /readyz, /metrics)" if bad else None


def _key_file(where: str, load: Any, value: str) -> Any:
    """Load a key file or directory now, so that a bad one is a config error naming the key."""
    try:
        return load(value)
    except security.KeyFileError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _security(
    sec: dict[str, Any], ing: dict[str, Any], groups: dict[str, GroupSettings], sinks: dict[str, Any]
) -> tuple[security.CurveConfig | None, security.CurveConfig | None]:
    """[security] -> the CURVE set-up of the input and of the results socket (None, None when off).

    Key files are loaded here (permissions included) so that `check-config` and a failed start name the
    key; the ingest process and the sink load them again when they open their sockets.
    """
    if not sec["curve"]:
        for name, key in SECURITY.items():  # a key that nothing would enforce must not look active
            if name not in ("curve", "log_interval_s") and sec[name] != key.default:
                raise ConfigError(f"security.{name}: needs curve = true (without it nothing checks it)")
        return None, None
    if not sec["secret_key"]:
        raise ConfigError("security.secret_key: required with curve = true (sacmf keygen daemon --dir keys)")
    _key_file("security.secret_key", security.load_secret_certificate, sec["secret_key"])
    for name in ("allow_ips", "deny_ips"):
        try:
            security.parse_networks([str(v) for v in sec[name]], f"security.{name}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    common = {
        "secret_file": Path(sec["secret_key"]),
        "allow_ips": tuple(str(v) for v in sec["allow_ips"]),
        "deny_ips": tuple(str(v) for v in sec["deny_ips"]),
        "log_interval_s": float(sec["log_interval_s"]),
    }
    networked = [ep for ep in ing["endpoints"] if not ep.startswith("inproc://")]
    if len(networked) != len(ing["endpoints"]):  # inproc has no security mechanism: no half-secured socket
        raise ConfigError("ingest.endpoints: with [security] curve = true, inproc:// cannot be mixed with others")
    # a key the topology never reads must not look active (as without curve): name the key that would
    unused = {
        "sensor_server_keys": (not ing["bind"], "[ingest] bind = false (publishers bind)"),
        "authorized_sensors": (ing["bind"], "[ingest] bind = true"),
        "results_server_key": (bool(sinks["zmq_endpoint"]) and not sinks["zmq_bind"], "[sinks] zmq_bind = false"),
        "authorized_readers": (bool(sinks["zmq_endpoint"]) and sinks["zmq_bind"], "[sinks] zmq_bind = true"),
    }
    for name, (read, when) in unused.items():
        if sec[name] and not read:
            raise ConfigError(f"security.{name}: only read with {when}; this config never uses it, remove it")
    server_keys: dict[str, Path] = {}
    if ing["bind"]:
        if not sec["authorized_sensors"]:
            raise ConfigError("security.authorized_sensors: required with curve = true and [ingest] bind = true")
        # a bad directory is a config error; a bad file in it is not: serving refuses that one key (logged and
        # counted), as it does when the file appears while running (`check-config` warns about it)
        known, problems = _key_file(
            "security.authorized_sensors", security.scan_checked_directory, sec["authorized_sensors"]
        )
        refused = security.refused_key_names(problems)
    else:
        for ep, path in sec["sensor_server_keys"].items():
            if ep not in ing["endpoints"]:
                raise ConfigError(f"security.sensor_server_keys.{ep}: not one of [ingest] endpoints")
            if not isinstance(path, str) or not path:
                raise ConfigError(f"security.sensor_server_keys.{ep}: expected the path of a public key file")
            server_keys[ep] = Path(path)
        missing = [ep for ep in networked if ep not in server_keys]
        if missing:
            raise ConfigError(f"security.sensor_server_keys: no publisher key for endpoint {missing[0]}")
        known, refused = {}, {}
        for ep, path in server_keys.items():
            public = _key_file(f"security.sensor_server_keys.{ep}", security.load_public_certificate, str(path))
            known[public] = security.key_name(path)
    grants: dict[str, tuple[str, ...]] = {}
    for who, granted in sec["sensor_groups"].items():
        if not isinstance(granted, list) or not all(isinstance(g, str) for g in granted):
            raise ConfigError(f"security.sensor_groups.{who}: expected a list of group names")
        unknown = [g for g in granted if g not in groups]
        if unknown:
            raise ConfigError(f"security.sensor_groups.{who}: group {unknown[0]!r} is not configured")
        grants[who] = tuple(granted)
    try:
        security.resolve_groups(grants, known, refused)
    except security.KeyFileError as exc:
        raise ConfigError(f"security.sensor_groups: {exc}") from exc
    ingest_curve = security.CurveConfig(
        authorized_dir=Path(sec["authorized_sensors"]) if ing["bind"] else None,
        server_keys=server_keys,
        groups=grants,
        **common,
    )
    results_curve = None
    if sinks["zmq_endpoint"]:
        if sinks["zmq_bind"]:
            if not sec["authorized_readers"]:
                raise ConfigError("security.authorized_readers: required with curve = true and [sinks] zmq_bind")
            _key_file("security.authorized_readers", security.scan_checked_directory, sec["authorized_readers"])
            results_curve = security.CurveConfig(authorized_dir=Path(sec["authorized_readers"]), **common)
        else:
            if not sec["results_server_key"]:
                raise ConfigError("security.results_server_key: required with curve = true and zmq_bind = false")
            _key_file("security.results_server_key", security.load_public_certificate, sec["results_server_key"])
            results_curve = security.CurveConfig(server_key=Path(sec["results_server_key"]), **common)
    return ingest_curve, results_curve


def _rate_limits(r: dict[str, Any], groups: dict[str, GroupSettings]) -> dict[str, security.RateLimit]:
    """[rate_limit] -> one token bucket per configured sensor: defaults < group < sensor overrides."""
    base = {k: r[k] for k in RATE}
    for name in r["groups"]:
        if name not in groups:
            raise ConfigError(f"rate_limit.groups.{name}: not a configured group")
    for key in r["sensors"]:
        group, _, sensor = key.partition("/")
        if group not in groups or sensor not in groups[group].sensors:
            raise ConfigError(f'rate_limit.sensors."{key}": not a configured "group/sensor"')
    for name, over in r["groups"].items():  # validated first: a table of known keys, right types
        _section(over, RATE, f"rate_limit.groups.{name}")
    for key, over in r["sensors"].items():
        _section(over, RATE, f'rate_limit.sensors."{key}"')
    out = {}
    for g in groups.values():
        per_group = {**base, **r["groups"].get(g.name, {})}  # only the keys given override
        for sensor in g.sensors:
            key = f"{g.name}/{sensor}"
            spec = {**per_group, **r["sensors"].get(key, {})}
            limit = security.RateLimit(
                float(spec["messages_per_s"]), float(spec["bytes_per_s"]), float(spec["burst_s"])
            )
            if limit.enabled:
                out[key] = limit
    return out


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (TOML files are UTF-8): byte {exc.start}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse(raw, str(path))
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(f"{path}:") else f"{path}: {msg}") from exc
