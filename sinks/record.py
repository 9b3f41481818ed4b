"""Result and late-data records: the one contract between the daemon and every sink (docs/results.md).

Why plain dataclasses of str/int/float/list/dict: records cross threads (sink workers), processes
(ZeroMQ subscribers in any language) and files (JSONL, MCAP), so they must not hold tensors, numpy
arrays or references to window buffers that the pipeline may reuse. The constructors coerce numpy
scalars to Python numbers and validate ranges once, at the producer, so a bad value (a NaN score, a
probability list of the wrong length) fails loudly where it is made instead of poisoning every sink.

``to_wire`` / ``from_wire`` are the only (de)serialisers: the ZeroMQ publisher packs the dict with
msgpack, the JSONL sink dumps it as JSON, the MCAP recorder packs it with msgpack. Readers ignore
unknown keys, so fields can be added without a schema bump; removing or changing the meaning of a
field bumps ``SCHEMA_VERSION``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
KIND_RESULT = "result"
KIND_LATE = "late"
MODALITIES = ("image", "sequence")
NOT_FUSED = "none"  # image_fusion.method on the wire for a window whose Image-A was not fused
LATE_REASONS = ("closed", "expired")


class RecordError(ValueError):
    """A record (or a wire dict) violates the schema; the message names the field."""


# ---------------------------------------------------------------- coercion helpers


def _int(name: str, value: object, minimum: int | None = None) -> int:
    if isinstance(value, bool):
        raise RecordError(f"{name} must be an int, got a bool")
    try:
        out = operator.index(value)  # accepts numpy integers, rejects floats
    except TypeError:
        raise RecordError(f"{name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and out < minimum:
        raise RecordError(f"{name} must be >= {minimum}, got {out}")
    return out


def _float(name: str, value: object, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool | str | bytes):
        raise RecordError(f"{name} must be a number, got {type(value).__name__}")
    try:
        out = float(value)  # numpy scalars and ints are fine
    except (TypeError, ValueError):
        raise RecordError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(out):
        raise RecordError(f"{name} must be finite, got {out}")
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise RecordError(f"{name} must be in [{lo}, {hi}], got {out}")
    return out


def _str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _probs(name: str, values: Any) -> list[float]:
    if isinstance(values, str | bytes | dict) or not hasattr(values, "__iter__"):
        raise RecordError(f"{name} must be a list of probabilities")
    return [_float(f"{name}[{i}]", v, 0.0, 1.0) for i, v in enumerate(values)]


def _get(d: Any, key: str, where: str) -> Any:
    try:
        return d[key]
    except KeyError:
        raise RecordError(f"{where}: missing field {key!r}") from None
    except TypeError:
        raise RecordError(f"{where}: expected a map, got {type(d).__name__}") from None


# ---------------------------------------------------------------- result record


@dataclass(slots=True)
class Detection:
    """One object found in the window's image (coordinates of the image_a frame, in pixels)."""

    box: list[float]  # [x0, y0, x1, y1], x0 <= x1, y0 <= y1, pixels, origin top-left
    cls: str  # class name, one of ResultRecord.class_names
    score: float  # detection confidence in [0, 1]
    class_probs: list[float]  # aligned with ResultRecord.class_names

    def __post_init__(self) -> None:
        box = list(self.box) if hasattr(self.box, "__iter__") else self.box
        if not isinstance(box, list) or len(box) != 4:
            raise RecordError("detection.box must be [x0, y0, x1, y1]")
        self.box = [_float(f"detection.box[{i}]", v) for i, v in enumerate(box)]
        if self.box[0] > self.box[2] or self.box[1] > self.box[3]:
            raise RecordError(f"detection.box must have x0 <= x1 and y0 <= y1, got {self.box}")
        self.cls = _str("detection.class", self.cls)
        self.score = _float("detection.score", self.score, 0.0, 1.0)
        self.class_probs = _probs("detection.class_probs", self.class_probs)


@dataclass(slots=True)
class TokenStats:
    """Summary of the per-token (or per-feature-group) fusion weights of one modality.

    The full weight vector is model-internal and large; subscribers need to see whether the model
    suppressed a modality's redundant tokens, which mean/min/max answer.
    """

    mean: float
    min: float
    max: float
    n: int  # number of tokens summarised

    def __post_init__(self) -> None:
        self.mean = _float("tokens.mean", self.mean)
        self.min = _float("tokens.min", self.min)
        self.max = _float("tokens.max", self.max)
        self.n = _int("tokens.n", self.n, 1)
        if not self.min <= self.mean <= self.max:
            raise RecordError(f"tokens need min <= mean <= max, got {self.min}, {self.mean}, {self.max}")

    @classmethod
    def of(cls, weights: Any) -> TokenStats:
        """Summarise any iterable of numbers (a list, a 1-D numpy array, a CPU tensor's ``tolist()``)."""
        values = [_float("token weight", v) for v in weights]
        if not values:
            raise RecordError("token weights must not be empty")
        lo, hi = min(values), max(values)
        mean = min(max(math.fsum(values) / len(values), lo), hi)  # rounding must not put it outside [lo, hi]
        return cls(mean, lo, hi, len(values))


@dataclass(slots=True)
class FusionWeights:
    """How much the fused representation relied on each modality (SA-CMF redundancy weights)."""

    image: float  # modality-level weight of the image branch
    sequence: float  # modality-level weight of the radiation-sequence branch
    tokens: dict[str, TokenStats] = field(default_factory=dict)  # modality -> per-token summary

    def __post_init__(self) -> None:
        self.image = _float("fusion.image", self.image)
        self.sequence = _float("fusion.sequence", self.sequence)
        if not isinstance(self.tokens, dict):
            raise RecordError("fusion.tokens must be a dict modality -> TokenStats")
        for key, value in self.tokens.items():
            if key not in MODALITIES:
                raise RecordError(f"fusion.tokens has unknown modality {key!r}; known: {MODALITIES}")
            if not isinstance(value, TokenStats):
                raise RecordError(f"fusion.tokens[{key!r}] must be a TokenStats")


@dataclass(slots=True)
class ImageFusion:
    """How the window's Image-A was pixel-fused with Image-B before the model ([image_fusion]).

    Set only when the model was fed a fused frame, so a consumer can tell a fused window from one that
    went through unfused (a camera missing, or the stage off): a model trained on fused windows answers
    differently on raw ones. On the wire an unfused window says ``{"method": "none", "sha256": nil}``
    (always a map, so every record has the same keys).
    """

    method: str  # "mean", "cddfuse", "crossfuse" or "cmmdl"
    sha256: str | None = None  # of the fusion weights (file, or folder of files); None for "mean"

    def __post_init__(self) -> None:
        self.method = _str("image_fusion.method", self.method)
        if not self.method or self.method == NOT_FUSED:
            raise RecordError(f"image_fusion.method must name a method, got {self.method!r} (unfused: None)")
        if self.sha256 is not None:
            self.sha256 = _str("image_fusion.sha256", self.sha256)


@dataclass(slots=True)
class ResultRecord:
    """What the daemon publishes for one fired window. Window id = (group, start_ns)."""

    group: str
    start_ns: int  # window start, event time, ns since the Unix epoch (inclusive)
    end_ns: int  # window end (exclusive)
    presence: dict[str, bool]  # configured role -> had data in the window
    class_names: list[str]
    target_probs: list[float]  # probability of each class for the window's target
    fusion: FusionWeights
    detections: list[Detection] = field(default_factory=list)
    mi_nats: float | None = None  # cross-modal mutual-information estimate; None when not computed
    latency_s: float = 0.0  # wall clock at publish minus end_ns
    model_version: str = ""
    revision: int = 0  # 0 for the first emission; +1 per late-data update of the same window
    flushed: bool = False  # force-fired (shutdown / end of replay) before the watermark passed its end
    image_fusion: ImageFusion | None = None  # the pixel fusion the model's Image-A went through; None: unfused

    def __post_init__(self) -> None:
        self.group = _str("group", self.group)
        self.start_ns = _int("start_ns", self.start_ns)
        self.end_ns = _int("end_ns", self.end_ns)
        if self.end_ns <= self.start_ns:
            raise RecordError(f"end_ns ({self.end_ns}) must be > start_ns ({self.start_ns})")
        if not isinstance(self.presence, dict):
            raise RecordError("presence must be a dict role -> bool")
        for role, present in self.presence.items():
            if not isinstance(role, str) or not isinstance(present, bool):
                raise RecordError(f"presence must map str -> bool, got {role!r}: {present!r}")
        if not isinstance(self.class_names, list | tuple):
            raise RecordError("class_names must be a list of str")
        self.class_names = [_str(f"class_names[{i}]", c) for i, c in enumerate(self.class_names)]
        self.target_probs = _probs("target_probs", self.target_probs)
        n = len(self.class_names)
        if len(self.target_probs) != n:
            raise RecordError(f"target_probs has {len(self.target_probs)} entries for {n} class_names")
        if not isinstance(self.fusion, FusionWeights):
            raise RecordError("fusion must be a FusionWeights")
        dets = self.detections
        if not isinstance(dets, list) or not all(isinstance(d, Detection) for d in dets):
            raise RecordError("detections must be a list of Detection")
        for i, det in enumerate(self.detections):
            if det.cls not in self.class_names:
                raise RecordError(f"detections[{i}].class {det.cls!r} is not in class_names")
            if len(det.class_probs) != n:
                got = len(det.class_probs)
                raise RecordError(f"detections[{i}].class_probs has {got} entries for {n} classes")
        if self.mi_nats is not None:
            self.mi_nats = _float("mi_nats", self.mi_nats, 0.0)
        self.latency_s = _float("latency_s", self.latency_s)
        self.model_version = _str("model_version", self.model_version)
        self.revision = _int("revision", self.revision, 0)
        if not isinstance(self.flushed, bool):
            raise RecordError("flushed must be a bool")
        if self.image_fusion is not None and not isinstance(self.image_fusion, ImageFusion):
            raise RecordError("image_fusion must be an ImageFusion or None")

    @property
    def window_id(self) -> tuple[str, int]:
        return (self.group, self.start_ns)

    @property
    def topic(self) -> str:
        return f"det/{self.group}"

    @property
    def target_class(self) -> str:
        """The most probable class (first one on ties); a convenience, not on the wire."""
        best = max(range(len(self.target_probs)), key=self.target_probs.__getitem__)
        return self.class_names[best]


# ---------------------------------------------------------------- late record


def final_revisions(records: Iterable[ResultRecord]) -> list[ResultRecord]:
    """The highest revision of each window, in the order the windows first came out.

    Under ``late_policy = "update"`` a window id can come out several times, each revision holding more
    late data than the last; a consumer that scores or stores windows wants the last one.
    """
    latest: dict[tuple[str, int], ResultRecord] = {}
    for r in records:
        seen = latest.get(r.window_id)
        if seen is None or r.revision >= seen.revision:
            latest[r.window_id] = r
    return list(latest.values())


@dataclass(slots=True)
class LateRecord:
    """Data that arrived after its window had fired: never dropped silently (daemon.md §1.4)."""

    group: str
    sensor: str
    t_ns: int  # event time of the first late sample (or the frame), ns since the Unix epoch
    n_samples: int  # late samples in the message (1 for a frame)
    reason: str  # "closed": its window had fired; "expired": its window never existed
    recv_ns: int  # wall clock when the message arrived
    seq: int | None = None  # the message's sequence number, to find it in a recording

    def __post_init__(self) -> None:
        self.group = _str("group", self.group)
        self.sensor = _str("sensor", self.sensor)
        self.t_ns = _int("t_ns", self.t_ns)
        self.n_samples = _int("n_samples", self.n_samples, 1)
        self.reason = _str("reason", self.reason)
        if self.reason not in LATE_REASONS:
            raise RecordError(f"reason must be one of {LATE_REASONS}, got {self.reason!r}")
        self.recv_ns = _int("recv_ns", self.recv_ns)
        if self.seq is not None:
            self.seq = _int("seq", self.seq, 0)


# ---------------------------------------------------------------- wire form


def _tokens_to_wire(t: TokenStats) -> dict:
    return {"mean": t.mean, "min": t.min, "max": t.max, "n": t.n}


def to_wire(record: ResultRecord | LateRecord) -> dict:
    """The documented map (docs/results.md): only str keys and msgpack/JSON-native values."""
    if isinstance(record, ResultRecord):
        f = record.fusion
        return {
            "kind": KIND_RESULT,
            "schema": SCHEMA_VERSION,
            "group": record.group,
            "start_ns": record.start_ns,
            "end_ns": record.end_ns,
            "revision": record.revision,
            "flushed": record.flushed,
            "presence": dict(record.presence),
            "class_names": list(record.class_names),
            "target_probs": list(record.target_probs),
            "detections": [
                {"box": list(d.box), "class": d.cls, "score": d.score, "class_probs": list(d.class_probs)}
                for d in record.detections
            ],
            "fusion": {
                "image": f.image,
                "sequence": f.sequence,
                "tokens": {k: _tokens_to_wire(v) for k, v in f.tokens.items()},
            },
            "mi_nats": record.mi_nats,
            "latency_s": record.latency_s,
            "model_version": record.model_version,
            "image_fusion": (
                {"method": NOT_FUSED, "sha256": None}
                if record.image_fusion is None
                else {"method": record.image_fusion.method, "sha256": record.image_fusion.sha256}
            ),
        }
    if isinstance(record, LateRecord):
        return {
            "kind": KIND_LATE,
            "schema": SCHEMA_VERSION,
            "group": record.group,
            "sensor": record.sensor,
            "t_ns": record.t_ns,
            "n_samples": record.n_samples,
            "reason": record.reason,
            "recv_ns": record.recv_ns,
            "seq": record.seq,
        }
    raise TypeError(f"to_wire takes a ResultRecord or LateRecord, got {type(record).__name__}")


def _result_from_wire(d: dict) -> ResultRecord:
    w = "result"
    fusion_d = _get(d, "fusion", w)
    tokens_d = _get(fusion_d, "tokens", "fusion")
    if not isinstance(tokens_d, dict):
        raise RecordError("fusion.tokens must be a map")
    stats = ("mean", "min", "max", "n")
    tokens = {k: TokenStats(*(_get(v, f, f"tokens.{k}") for f in stats)) for k, v in tokens_d.items()}
    fusion = FusionWeights(_get(fusion_d, "image", "fusion"), _get(fusion_d, "sequence", "fusion"), tokens)
    dets_d = _get(d, "detections", w)
    if not isinstance(dets_d, list):
        raise RecordError("detections must be a list")
    detections = [
        Detection(
            _get(x, "box", "detection"),
            _get(x, "class", "detection"),
            _get(x, "score", "detection"),
            _get(x, "class_probs", "detection"),
        )
        for x in dets_d
    ]
    return ResultRecord(
        group=_get(d, "group", w),
        start_ns=_get(d, "start_ns", w),
        end_ns=_get(d, "end_ns", w),
        presence=_get(d, "presence", w),
        class_names=_get(d, "class_names", w),
        target_probs=_get(d, "target_probs", w),
        fusion=fusion,
        detections=detections,
        mi_nats=_get(d, "mi_nats", w),
        latency_s=_get(d, "latency_s", w),
        model_version=_get(d, "model_version", w),
        revision=_get(d, "revision", w),
        flushed=_get(d, "flushed", w),
        image_fusion=_image_fusion_from_wire(d.get("image_fusion")),  # absent in records written before it
    )


def _image_fusion_from_wire(v: Any) -> ImageFusion | None:
    """None for an unfused window, and for a record written before the field existed (no key)."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise RecordError(f"image_fusion must be a map, got {type(v).__name__}")
    method = _get(v, "method", "image_fusion")
    if method == NOT_FUSED:
        if v.get("sha256") is not None:
            raise RecordError("image_fusion.sha256 must be nil when method is 'none'")
        return None
    return ImageFusion(method, v.get("sha256"))


def from_wire(d: dict) -> ResultRecord | LateRecord:
    """Inverse of ``to_wire``; unknown keys are ignored (additive schema changes), a newer schema is not."""
    if not isinstance(d, dict):
        raise RecordError(f"a record must be a map, got {type(d).__name__}")
    schema = _int("schema", _get(d, "schema", "record"))
    if schema != SCHEMA_VERSION:
        raise RecordError(f"unsupported schema {schema}; this reader knows {SCHEMA_VERSION}")
    kind = _get(d, "kind", "record")
    if kind == KIND_RESULT:
        return _result_from_wire(d)
    if kind == KIND_LATE:
        w = "late"
        return LateRecord(
            group=_get(d, "group", w),
            sensor=_get(d, "sensor", w),
            t_ns=_get(d, "t_ns", w),
            n_samples=_get(d, "n_samples", w),
            reason=_get(d, "reason", w),
            recv_ns=_get(d, "recv_ns", w),
            seq=d.get("seq"),
        )
    raise RecordError(f"unknown record kind {kind!r}")
