"""`sacmf fuse`, `fusion-metrics`, `fuse-train` and `bench-fusion`: the pixel-fusion toolkit commands.

Why these four: they are what users of the three fusion repositories keep asking for (fusion.md §7):
colour output without fringes, any image size without running out of memory (tiling), 16-bit data,
metrics that can be compared with the papers (one evaluator, its conventions explicit), retraining on
one's own data with the authors' schedule, and an honest number for time and memory per frame before
putting a network into the daemon.

Heavy imports (torch, the networks) happen inside the command bodies, so ``sacmf --help`` and the other
subcommands stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np

from daemon.cli_types import integer, number, sigterm_as_interrupt

if TYPE_CHECKING:
    import torch

    from model import fusion_train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "golden"
BENCH_PAIR = SHARED / "fusion_testdata" / "TNO"
NETWORKS = ("cddfuse", "crossfuse", "cmmdl")
METHODS = (*NETWORKS, "mean")
# glibc: never hand big buffers back to the kernel, so re-used memory is not page-faulted in again.
# CDDFuse's notes measured about half the CPU time at 640x480, at the price of a higher peak RSS.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**34)}


# ------------------------------------------------------------------------------------------------
# progress


class Progress:
    """A progress line on stderr: redrawn with \\r on a terminal, one plain line per item otherwise.

    Plain lines matter as much as the bar: under nohup, CI or a pipe, carriage returns turn a log into
    one unreadable line.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.total = max(total, 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self.done = 0
        self._width = 0

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        elapsed = time.monotonic() - self.started
        eta = ""
        if 0 < done < self.total:
            eta = f" ETA {_duration(elapsed / done * (self.total - done))}"
        if self.tty:
            filled = int(24 * done / self.total) if self.total else 24
            bar = "#" * filled + "-" * (24 - filled)
            line = f"\r{self.label} [{bar}] {done}/{self.total} {note}{eta}"
            pad = max(0, self._width - len(line))
            self._width = len(line)
            self.stream.write(line + " " * pad)
        else:
            self.stream.write(f"{self.label} {done}/{self.total} {note}{eta}\n")
        self.stream.flush()

    def close(self, summary: str = "") -> None:
        if self.tty:
            self.stream.write("\n")
        if summary:
            self.stream.write(summary + "\n")
        self.stream.flush()


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s // 60:.0f} min {s % 60:02.0f} s"
    return f"{s // 3600:.0f} h {s % 3600 // 60:02.0f} min"


def _set_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# fuse


@dataclass(frozen=True)
class FuseSettings:
    """Options of ``sacmf fuse`` that shape the output images."""

    tile: int = 0  # 0: whole image in one pass
    overlap: int | None = None  # None: the method's default
    bits: int | None = None  # None: the larger bit depth of the two sources
    stretch: bool | None = None  # None: the authors' choice for the method
    device: str = "cpu"


@dataclass(frozen=True)
class FuseOutcome:
    written: list[Path]
    failed: list[tuple[Path, str]]
    seconds: list[float]
    notes: list[str]


def fuse_folder(
    method_name: str,
    checkpoint: str | Path | None,
    ir_dir: str | Path,
    vi_dir: str | Path,
    out_dir: str | Path,
    settings: FuseSettings | None = None,
    *,
    progress: Progress | None = None,
) -> FuseOutcome:
    """Fuse every name-paired image of two folders into ``out_dir/<name>.png``.

    Raises ``fusion_io.PairingError`` (listing every unpaired, unreadable or mismatched file) before any
    work is done; an image that fails later (e.g. a truncated JPEG that passed the header check) is
    reported in ``failed`` and the others are still written.
    """
    import torch

    from model import fusion, fusion_io

    s = settings or FuseSettings()
    if s.bits not in (None, 8, 16):
        raise ValueError(f"bits must be 8 or 16, got {s.bits}")
    fusion.tile_overlap(fusion.get_method(method_name), s.tile, s.overlap)  # before any work: exit 2
    pairs = fusion_io.pair_files(ir_dir, vi_dir)
    out = Path(out_dir)
    inputs = {p.resolve() for pair in pairs for p in pair}
    clash = [t for ir_path, _ in pairs if (t := (out / f"{ir_path.stem}.png").resolve()) in inputs]
    if clash:
        raise ValueError(f"--out {out} would overwrite the input {clash[0]}: choose another folder")
    try:
        method, model = fusion.load_method(method_name, checkpoint, device=s.device)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # unpickling, safetensors, a folder for a file, no CUDA: name what failed
        raise ValueError(
            f"cannot load {method_name} from {checkpoint} on {s.device}: {type(exc).__name__}: {exc}"
        ) from exc
    stretch = (method.stretch != "none") if s.stretch is None else s.stretch
    notes: list[str] = []
    if method.raw_range == "free" and s.stretch is False:
        notes.append(f"{method.name}: the min-max stretch is part of the network's output; --no-stretch ignored")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    failed: list[tuple[Path, str]] = []
    seconds: list[float] = []
    gray16_note = False
    checked = False
    if progress is not None:
        progress.total = len(pairs)
    for i, (ir_path, vi_path) in enumerate(pairs, 1):
        t0 = time.perf_counter()
        try:
            pair = fusion_io.read_pair(ir_path, vi_path)
            ir, vi = pair.tensors()
            if not checked:
                checked = True
                notes.extend(_weights_health(model, ir, vi))
            with torch.inference_mode():
                raw = fusion.fuse_tensors(
                    method, model, ir, vi, tile=s.tile, overlap=s.overlap, device=s.device if s.tile else None
                )
            y = fusion.unit_output(method, raw, stretch=stretch)[0, 0].cpu().numpy()
            bits = s.bits or pair.bits
            cbcr = pair.vi_cbcr
            if bits == 16 and cbcr is not None:
                cbcr = None  # Pillow cannot write 16-bit colour: keep the fused luma at full depth
                gray16_note = True
            image = fusion.compose_fused(method, y, cbcr, stretch=stretch)
            target = out / f"{ir_path.stem}.png"
            fusion_io.write_image(target, image, bits=bits)  # type: ignore[arg-type]
            written.append(target)
        except (fusion_io.ImageReadError, ValueError, OSError) as exc:
            failed.append((ir_path, str(exc)))
        dt = time.perf_counter() - t0
        seconds.append(dt)
        if progress is not None:
            progress.update(i, f"{ir_path.name} {dt:.2f} s")
    if gray16_note:
        notes.append("16-bit output is gray (Pillow cannot write 16-bit colour): colour pairs kept only the fused Y")
    return FuseOutcome(written, failed, seconds, notes)


def _weights_health(model: object, ir: torch.Tensor, vi: torch.Tensor) -> list[str]:
    """Warn about CrossFuse weights whose fixed deep-skip weights blow up (docs/FUSION.md, CrossFuse
    training): checked once, on a central crop of at most 256 px of the first pair (cheap next to a fusion)."""
    import torch

    from model.crossfuse import CrossFuse, deep_skip_health

    if not isinstance(model, CrossFuse):
        return []
    h, w = ir.shape[-2:]
    top, left = max(0, (h - 256) // 2), max(0, (w - 256) // 2)
    crop = (..., slice(top, top + 256), slice(left, left + 256))
    from model.fusion import METHODS, pad_min_side

    side = METHODS["crossfuse"].min_side  # the network pads smaller images up to this: so does the check
    param = next(model.parameters())
    with torch.inference_mode():
        health = deep_skip_health(
            model.encoder_ir,
            model.encoder_vi,
            pad_min_side(ir[crop], side).to(param.device),
            pad_min_side(vi[crop], side).to(param.device),
        )
    if not health.ill_conditioned:
        return []
    return [
        f"crossfuse: these weights make the decoder's fixed deep-skip weights blow up ({health.describe()} on the "
        "first pair): expect flat grey output with a few extreme pixels (docs/FUSION.md, CrossFuse training)"
    ]


def _cmd_fuse(args: argparse.Namespace) -> int:
    from model import fusion_io

    _set_threads(args.threads)
    settings = FuseSettings(args.tile, args.overlap, args.bits, args.stretch, args.device)
    progress = Progress(0, f"fuse {args.method}")
    try:
        outcome = fuse_folder(args.method, args.ckpt, args.ir, args.vi, args.out, settings, progress=progress)
    except fusion_io.PairingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NotADirectoryError as exc:
        print(f"error: not a folder: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # FileNotFoundError, an --out that is a file, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    med = statistics.median(outcome.seconds) if outcome.seconds else 0.0
    progress.close(
        f"fused {len(outcome.written)} pair(s) with {args.method} into {args.out} "
        f"(median {med:.2f} s per pair, total {sum(outcome.seconds):.1f} s)"
    )
    for note in outcome.notes:
        print(f"note: {note}", file=sys.stderr)
    for path, why in outcome.failed:
        print(f"error: {path}: {why}", file=sys.stderr)
    return 1 if outcome.failed else 0


# ------------------------------------------------------------------------------------------------
# fusion-metrics


def read_gray255(path: str | Path) -> np.ndarray:
    """An image as the evaluators see it: 2-D float64 gray on the 0-255 scale.

    Colour becomes BT.601 luma (what cv2's ``BGR2GRAY`` computes, up to its fixed-point rounding); gray
    stored as three equal channels is taken as is; 16-bit data is scaled to 0-255 because every metric
    constant assumes that scale (fusion.md §5.3 pitfall 1).
    """
    from model import fusion_io

    img = fusion_io.read_image(path)
    full = float(fusion_io.max_value(img))
    x = img.astype(np.float64)
    if x.ndim == 3:
        same = np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
        x = x[..., 0] if same else fusion_io.luma(x)
    return x * (255.0 / full) if full != 255.0 else x


def _fused_by_stem(folder: Path) -> dict[str, Path]:
    from model import fusion_io

    if not folder.is_dir():
        raise NotADirectoryError(folder)
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in fusion_io.IMAGE_SUFFIXES:
            if p.stem in found:
                raise ValueError(f"{found[p.stem]} and {p} share a name stem: which one is the fused image?")
            found[p.stem] = p
    return found


@dataclass(frozen=True)
class MetricsTable:
    names: list[str]  # image name stems, in order
    metrics: list[str]
    rows: list[dict[str, float]]

    def mean(self) -> dict[str, float]:
        """Over the images where a metric is defined (see ``undefined``); NaN where it never is."""
        out = {}
        for m in self.metrics:
            values = [r[m] for r in self.rows if math.isfinite(r[m])]
            out[m] = float(np.mean(values)) if values else math.nan
        return out

    def undefined(self) -> list[tuple[str, str]]:
        """(image, metric) pairs without a finite value, e.g. SCD or Qabf of a constant source."""
        return [
            (n, m) for n, r in zip(self.names, self.rows, strict=True) for m in self.metrics if not math.isfinite(r[m])
        ]


def evaluate_folders(
    ir_dir: str | Path,
    vi_dir: str | Path,
    fused_dir: str | Path,
    *,
    metrics: Sequence[str],
    convention: str = "cddfuse",
    progress: Progress | None = None,
) -> MetricsTable:
    """Score every fused image against its sources (paired by name); missing fused images are an error."""
    from model import fusion_io, fusion_metrics

    pairs = fusion_io.pair_files(ir_dir, vi_dir)
    fused = _fused_by_stem(Path(fused_dir))
    missing = [ir.stem for ir, _ in pairs if ir.stem not in fused]
    if missing:
        raise FileNotFoundError(f"no fused image in {fused_dir} for: {', '.join(missing)}")
    if progress is not None:
        progress.total = len(pairs)
    rows, names = [], []
    for i, (ir_path, vi_path) in enumerate(pairs, 1):
        t0 = time.perf_counter()
        ir, vi, f = read_gray255(ir_path), read_gray255(vi_path), read_gray255(fused[ir_path.stem])
        if f.shape != ir.shape:
            raise ValueError(f"{fused[ir_path.stem]}: size {f.shape} differs from its sources {ir.shape}")
        # read_gray255 put every file on the 0-255 scale itself: no [0, 1] guess for dark 16-bit images
        rows.append(fusion_metrics.evaluate_pair(ir, vi, f, metrics=metrics, convention=convention, check_scale=False))
        names.append(ir_path.stem)
        if progress is not None:
            progress.update(i, f"{ir_path.stem} {time.perf_counter() - t0:.2f} s")
    return MetricsTable(names, list(metrics), rows)


def write_metrics(table: MetricsTable, out_dir: str | Path, *, convention: str) -> tuple[Path, Path]:
    """``metrics.csv`` (one row per image, then ``mean``) and ``metrics.md`` (the same as a table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "metrics.csv", out / "metrics.md"
    mean = table.mean()
    with csv_path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        w = csv.writer(fh)
        w.writerow(["image", *table.metrics])
        for name, row in zip(table.names, table.rows, strict=True):
            w.writerow([name, *(repr(row[m]) for m in table.metrics)])
        w.writerow(["mean", *(repr(mean[m]) for m in table.metrics)])
    lines = [
        f"Fusion metrics, convention `{convention}` (model/fusion_metrics.py), {len(table.rows)} image(s).",
        "",
        "| image | " + " | ".join(table.metrics) + " |",
        "|---|" + "---|" * len(table.metrics),
    ]
    for name, row in zip(table.names, table.rows, strict=True):
        lines.append(f"| {name} | " + " | ".join(f"{row[m]:.4f}" for m in table.metrics) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{mean[m]:.4f}**" for m in table.metrics) + " |")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
    return csv_path, md_path


def _parse_metrics(text: str) -> list[str]:
    from model import fusion_metrics

    if text == "all":
        return list(fusion_metrics.ALL)
    if text == "cddfuse":
        return list(fusion_metrics.CDDFUSE_TABLE)
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in fusion_metrics.ALL]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(fusion_metrics.ALL)}")
    return names


def _cmd_fusion_metrics(args: argparse.Namespace) -> int:
    try:
        metrics = _parse_metrics(args.metrics)
        progress = Progress(0, "fusion-metrics")
        table = evaluate_folders(
            args.ir, args.vi, args.fused, metrics=metrics, convention=args.convention, progress=progress
        )
    except (ValueError, OSError) as exc:  # pairing, unreadable images, missing folders or files
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        csv_path, md_path = write_metrics(table, args.out, convention=args.convention)
    except OSError as exc:
        print(f"error: cannot write to {args.out}: {exc}", file=sys.stderr)
        return 2
    progress.close(f"wrote {csv_path} and {md_path}")
    print(md_path.read_text(encoding="utf-8", errors="surrogateescape"), end="")
    for name, metric in table.undefined():
        print(
            f"warning: {metric} is undefined for {name} (a constant source, or an image smaller than the metric's "
            "window); left out of the mean",
            file=sys.stderr,
        )
    return 0


# ------------------------------------------------------------------------------------------------
# fuse-train


def _train_options(args: argparse.Namespace) -> fusion_train.TrainOptions:
    from model import fusion_train

    return fusion_train.TrainOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patch=args.patch,
        stride=args.stride,
        min_contrast="recipe" if args.min_contrast is None else (args.min_contrast or None),
        crops_per_image=args.crops_per_image,
        max_minutes=args.max_minutes,
        max_steps=args.max_steps,
        seed=args.seed,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        init=args.init,
        lr_decay=not args.no_lr_decay,
        deep_sign_weight=args.deep_sign_weight,
    )


def _cmd_fuse_train(args: argparse.Namespace) -> int:
    from model import fusion_io, fusion_train

    _set_threads(args.threads)
    try:
        options = _train_options(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress = Progress(0, f"fuse-train {args.method}")
    last_epoch = [-1]

    def on_step(info: fusion_train.StepInfo) -> None:
        if info.epoch != last_epoch[0]:
            if last_epoch[0] >= 0 and progress.tty:
                progress.stream.write("\n")
            last_epoch[0] = info.epoch
            progress.total = info.batches
            progress.started = time.monotonic() - info.seconds * (info.batch - 1)
            progress.label = f"{args.method} epoch {info.epoch + 1}/{info.epochs} stage {info.stage}"
        if info.note:
            if progress.tty:
                progress.stream.write("\n")
            progress.stream.write(f"warning: {info.note}\n")
        progress.update(info.batch, f"loss {info.losses['total']:.5g} lr {info.lr:.2g} {info.seconds:.2f} s/step")

    # Ctrl-C, or a batch scheduler's or systemd's SIGTERM: the first one asks train() to stop between
    # steps (a flag cannot be lost, where an exception raised at an arbitrary point can be swallowed by a
    # finaliser and leaves the step count and the log disagreeing); a second one stops inside the step.
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        with contextlib.suppress(OSError, ValueError):  # os.write: print() could re-enter a busy stderr
            os.write(sys.stderr.fileno(), b"\nstopping after this step (signal again to stop at once)\n")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = fusion_train.train(args.method, args.ir, args.vi, args.out, options, on_step=on_step, stop=stop.is_set)
    except KeyboardInterrupt:
        result = None
    except (fusion_io.PairingError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if result is None or result.interrupted:
        progress.close(f"interrupted; state saved in {Path(args.out) / fusion_train.STATE_FILE}: rerun with --resume")
        return 130
    where = ", ".join(str(p) for p in result.checkpoints) or "(none yet: no epoch completed)"
    status = "stopped early; continue with --resume" if result.stopped_early else "done"
    progress.close(
        f"{status}: {result.epochs_done} epoch(s), {result.global_step} step(s); checkpoints: {where}; "
        f"state: {result.state_file}"
    )
    return 0


# ------------------------------------------------------------------------------------------------
# bench-fusion


def _method_list(text: str) -> str:
    """Comma-separated method names, checked before any model loads (a typo was a traceback after it)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or [text]}; choose from {', '.join(METHODS)}")
    return ",".join(names)


def _parse_size(text: str) -> tuple[int, int]:
    """'640x480' (width x height, as camera resolutions are written) -> (height, width)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 640x480, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def bench_inputs(height: int, width: int) -> tuple[np.ndarray, np.ndarray, str]:
    """A registered IR/visible pair of the requested size: TNO pair 10 (640x480) cropped or tiled when
    the shared test data is there, else smooth seeded noise (timing does not depend on content much,
    but the FFT- and attention-based networks are not entirely content-blind)."""
    ir_path, vi_path = BENCH_PAIR / "ir" / "10.png", BENCH_PAIR / "vi" / "10.png"
    if ir_path.is_file() and vi_path.is_file():
        ir, vi = read_gray255(ir_path) / 255.0, read_gray255(vi_path) / 255.0
        reps = (math.ceil(height / ir.shape[0]), math.ceil(width / ir.shape[1]))
        ir, vi = (np.tile(x, reps)[:height, :width] for x in (ir, vi))
        return ir.astype(np.float32), vi.astype(np.float32), "TNO 10"
    rng = np.random.default_rng(0)
    from scipy import ndimage

    ir, vi = (ndimage.gaussian_filter(rng.random((height, width)), 3) for _ in range(2))
    ir, vi = ((x - x.min()) / (x.max() - x.min()) for x in (ir, vi))
    return ir.astype(np.float32), vi.astype(np.float32), "synthetic"


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def bench_worker(
    method_name: str, height: int, width: int, repeats: int, tile: int, threads: int | None
) -> dict[str, object]:
    """Time one method in this (fresh) process; peak RSS is this process's high-water mark."""
    import torch

    from model import fusion

    _set_threads(threads)
    ckpt = GOLDEN / method_name / "weights.safetensors"
    method = fusion.get_method(method_name)
    weights = "golden" if ckpt.is_file() else "random init"
    if method.needs_checkpoint and ckpt.is_file():
        _, model = fusion.load_method(method_name, ckpt)
    elif method.needs_checkpoint:
        torch.manual_seed(0)
        model = _random_model(method_name)
    else:
        model = None
    ir_np, vi_np, source = bench_inputs(height, width)
    ir, vi = torch.from_numpy(ir_np)[None, None], torch.from_numpy(vi_np)[None, None]
    rss_loaded = _current_rss_mb()
    with torch.inference_mode():  # one-off costs (kernel selection, lazy init) on a small input
        fusion.fuse_tensors(method, model, ir[..., :64, :64], vi[..., :64, :64])
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            fusion.fuse_tensors(method, model, ir, vi, tile=tile)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {
        "method": method_name,
        "tile": tile,
        "size": f"{width}x{height}",
        "threads": torch.get_num_threads(),
        "weights": weights,
        "input": source,
        "median_s": statistics.median(walls),
        "runs_s": walls,
        "cpu_s": statistics.median(cpus),
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": _peak_rss_mb(),
        "malloc_env": {k: os.environ[k] for k in MALLOC_ENV if k in os.environ},
    }


def _random_model(name: str) -> object:
    if name == "cddfuse":
        from model.cddfuse import CDDFuse

        return CDDFuse().eval()
    if name == "crossfuse":
        from model.crossfuse import CrossFuse

        return CrossFuse().eval()
    from model.cmmdl import CMMDL

    return CMMDL().eval()


@dataclass(frozen=True)
class BenchRow:
    method: str
    mode: str  # "whole" or "tile N"
    malloc: bool
    result: dict[str, object] | None
    error: str = ""


def run_bench(
    methods: Sequence[str],
    height: int,
    width: int,
    *,
    repeats: int,
    tile: int,
    threads: int | None,
    malloc_variant: bool,
    timeout_s: float,
    progress: Progress | None = None,
) -> list[BenchRow]:
    """Each (method, whole/tiled, allocator setting) in a fresh subprocess, so peak RSS is its own.

    ``tile`` 0 runs whole images only; ``malloc_variant`` adds a run of each with ``MALLOC_ENV``.
    """
    jobs = []
    for m in methods:
        for t in (0, tile) if tile > 0 else (0,):
            jobs.append((m, t, False))
            if malloc_variant:
                jobs.append((m, t, True))
    if progress is not None:
        progress.total = len(jobs)
    rows = []
    root = Path(__file__).resolve().parents[1]
    for i, (m, t, malloc) in enumerate(jobs, 1):
        cmd = [
            sys.executable,
            "-m",
            "daemon.fusion_commands",
            "bench-worker",
            m,
            str(height),
            str(width),
            str(repeats),
            str(t),
            str(threads or 0),
        ]
        env = dict(os.environ)
        for k in MALLOC_ENV:
            env.pop(k, None)
        if malloc:
            env.update(MALLOC_ENV)
        env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
        mode = "whole" if t == 0 else f"tile {t}"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                rows.append(BenchRow(m, mode, malloc, None, f"exit {proc.returncode}: {tail}"))
            else:
                rows.append(BenchRow(m, mode, malloc, json.loads(proc.stdout.strip().splitlines()[-1])))
        except subprocess.TimeoutExpired:
            rows.append(BenchRow(m, mode, malloc, None, f"timed out after {timeout_s:.0f} s"))
        if progress is not None:
            progress.update(i, f"{m} {mode}{' malloc' if malloc else ''} {time.perf_counter() - t0:.1f} s")
    return rows


def bench_table(rows: Sequence[BenchRow]) -> str:
    lines = [
        "| network | mode | glibc malloc env | median s/pair | CPU s/pair | peak RSS MB | RSS after load MB | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        env = "MMAP_MAX=0, TRIM=16G" if r.malloc else "default"
        if r.result is None:
            lines.append(f"| {r.method} | {r.mode} | {env} | - | - | - | - | {r.error} |")
            continue
        res = r.result
        note = f"{res['weights']} weights, {res['input']}, {res['threads']} thread(s)"
        lines.append(
            f"| {r.method} | {r.mode} | {env} | {res['median_s']:.2f} | {res['cpu_s']:.2f} | "
            f"{res['peak_rss_mb']:.0f} | {res['rss_after_load_mb']:.0f} | {note} |"
        )
    return "\n".join(lines)


def _cmd_bench_fusion(args: argparse.Namespace) -> int:
    height, width = args.size
    progress = Progress(0, "bench-fusion")
    with sigterm_as_interrupt():  # subprocess.run kills its worker on an interrupt, not on our SIGTERM
        rows = _bench_rows(args, height, width, progress)
    progress.close()
    print(f"bench-fusion: {width}x{height}, median of {args.repeats} run(s) after a small warm-up, one process each")
    print(bench_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2, default=str))
    return 1 if any(r.result is None for r in rows) else 0


def _bench_rows(args: argparse.Namespace, height: int, width: int, progress: Progress) -> list[BenchRow]:
    return run_bench(
        args.methods.split(","),
        height,
        width,
        repeats=args.repeats,
        tile=args.tile,
        threads=args.threads,
        malloc_variant=not args.no_malloc_variant,
        timeout_s=args.timeout,
        progress=progress,
    )


def bench_stage(
    methods: Sequence[str], height: int, width: int, repeats: int, checkpoint: Path, threads: int | None
) -> list[dict[str, object]]:
    """The daemon's ``[image_fusion]`` stage, per window, next to the SA-CMF path it sits in front of.

    Why: the stage runs in the prepare thread, one window after another, before the model's
    preprocessing; its time per window adds to every window's latency and bounds the daemon's
    throughput. Measured on one window of ``height`` x ``width`` uint16 frames (TNO pair 10, cropped),
    with the golden weights (time does not depend on trained values), against
    ``InferenceRunner.run`` on the same window (preprocessing + forward + result record, batch 1).
    """
    import torch

    from daemon.fusion_stage import FusionStage
    from daemon.inference import InferenceRunner
    from ingest.windowing import Frame, Samples, Window

    _set_threads(threads)
    ir, vi, source = bench_inputs(height, width)
    frames = {
        role: [Frame(role, 0, 400_000_000, 20_000_000, (img * 65535).astype(np.uint16))]
        for role, img in (("image_a", vi), ("image_b", ir))
    }
    rng = np.random.default_rng(0)
    samples = {
        role: Samples(None, (1 + 0.1 * rng.standard_normal(1000)).astype(np.float32), 1_000_000, t0=0)
        for role in ("seq_a", "seq_b")
    }
    window = Window("bench", 0, 1_000_000_000, frames, samples, dict.fromkeys((*frames, *samples), True), "full", "x")

    def median_ms(fn: object) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    runner = InferenceRunner(checkpoint, max_batch_size=1)
    runner.load()
    model_ms = median_ms(lambda: runner.run([window]))
    rows: list[dict[str, object]] = [{"method": "none (SA-CMF path alone)", "ms": model_ms, "ratio": 1.0}]
    for name in methods:
        ckpt = GOLDEN / name / "weights.safetensors"
        stage = FusionStage(name, ckpt if name != "mean" else None)
        with torch.inference_mode():
            ms = median_ms(lambda stage=stage: stage.process([window]))
        rows.append({"method": name, "ms": ms, "ratio": (ms + model_ms) / model_ms})
    for r in rows:
        r.update(size=f"{width}x{height}", input=source, threads=torch.get_num_threads())
    return rows


def _cmd_bench_stage(args: argparse.Namespace) -> int:
    height, width = args.size
    if not Path(args.checkpoint).is_file():
        print(f"error: no SA-CMF checkpoint at {args.checkpoint}", file=sys.stderr)
        return 2
    rows = bench_stage(args.methods.split(","), height, width, args.repeats, Path(args.checkpoint), args.threads)
    print(
        f"bench-fusion-stage: one window, {width}x{height} frames, median of {args.repeats}, "
        f"{rows[0]['threads']} thread(s)"
    )
    print("| [image_fusion] method | fusion ms per window | window -> result, x the SA-CMF path alone |")
    print("|---|---|---|")
    model_ms = float(rows[0]["ms"])
    for r in rows:
        fusion_ms = "–" if r is rows[0] else f"{float(r['ms']):.1f}"
        total = model_ms + (0.0 if r is rows[0] else float(r["ms"]))
        print(f"| {r['method']} | {fusion_ms} | {total:.1f} ms ({float(r['ratio']):.1f}x) |")
    return 0


# ------------------------------------------------------------------------------------------------
# argparse wiring


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fuse``, ``fusion-metrics``, ``fuse-train`` and ``bench-fusion`` to the ``sacmf`` parser."""
    f = sub.add_parser(
        "fuse",
        help="fuse IR/visible image pairs (paired by file name) with CDDFuse, CrossFuse, CMMDL or the mean",
        description="Colour visible images keep their colour (the fused Y gets the visible Cb/Cr back); "
        "any size works; --tile bounds memory. Output: OUT/<name>.png.",
    )
    f.add_argument("--method", required=True, choices=METHODS)
    f.add_argument("--ckpt", default=None, help="checkpoint file or folder (not needed for mean)")
    f.add_argument("--ir", required=True, help="folder of infrared images")
    f.add_argument("--vi", required=True, help="folder of visible images (gray or colour)")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--tile", type=int, default=0, help="tile side in px (0: whole image in one pass)")
    f.add_argument("--overlap", type=int, default=None, help="tile overlap in px (default: per method)")
    f.add_argument("--bits", type=int, choices=[8, 16], default=None, help="output depth (default: as the input)")
    f.add_argument(
        "--stretch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the authors' per-image min-max stretch (default: on for the networks, off for mean)",
    )
    f.add_argument("--threads", type=integer(1), default=None, help="torch CPU threads")
    f.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    f.set_defaults(func=_cmd_fuse)

    m = sub.add_parser(
        "fusion-metrics",
        help="score fused images against their sources: CSV per image, the mean, and a markdown table",
    )
    m.add_argument("--ir", required=True)
    m.add_argument("--vi", required=True)
    m.add_argument("--fused", required=True, help="folder of fused images, named like the sources")
    m.add_argument("--out", required=True, help="folder for metrics.csv and metrics.md")
    m.add_argument("--convention", default="cddfuse", choices=["cddfuse", "cmmdl", "metric"])
    m.add_argument(
        "--metrics",
        default="cddfuse",
        help="comma-separated names, 'cddfuse' (EN,SD,SF,MI,SCD,VIF,Qabf,SSIM; default) or 'all'",
    )
    m.set_defaults(func=_cmd_fusion_metrics)

    t = sub.add_parser(
        "fuse-train",
        help="train a fusion network with its authors' recipe on patches of image pairs (resumable)",
    )
    t.add_argument("--method", required=True, choices=NETWORKS)
    t.add_argument("--ir", required=True)
    t.add_argument("--vi", required=True)
    t.add_argument("--out", required=True, help="folder for models/, train_state.pt and train_log.csv")
    t.add_argument("--epochs", type=int, default=None, help="default: the authors' (120, 36, 100)")
    t.add_argument(
        "--batch-size", type=int, default=None, help="default: the authors' (8; CrossFuse stage 1: 2); sets all stages"
    )
    t.add_argument(
        "--lr", type=float, default=None, help="default: the authors' (1e-4; CrossFuse 1e-4 / 1e-3); sets all stages"
    )
    t.add_argument("--patch", type=int, default=None, help="patch side (default 128; CrossFuse 256)")
    t.add_argument("--stride", type=int, default=None, help="grid stride (default 200); 0: random crops per epoch")
    t.add_argument(
        "--crops-per-image", type=int, default=None, help="random crops per image and epoch (stride 0; default 6)"
    )
    t.add_argument(
        "--min-contrast",
        type=float,
        default=None,
        help="drop patches with (p90-p10)/p90 below this (default: the recipe's 0.1, none for CrossFuse; 0: keep all)",
    )
    t.add_argument(
        "--no-lr-decay",
        action="store_true",
        help="keep each stage's base lr for the whole run: the authors' decay milestones are epochs of their "
        "large sets, which a small set reaches after a few dozen steps (see docs/FUSION.md)",
    )
    t.add_argument(
        "--deep-sign-weight",
        type=float,
        default=None,
        help="CrossFuse only, not the authors': stage-1 penalty W * mean(relu(-A)) on each encoder's deep "
        "activity A, so that the decoder's fixed deep-skip weights stay bounded (see docs/FUSION.md)",
    )
    t.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier run in OUT (refused without it)")
    t.add_argument("--init", default=None, help="start from these weights instead of a random init")
    t.add_argument("--max-minutes", type=float, default=None, help="stop (state saved) after this long")
    t.add_argument("--max-steps", type=int, default=None, help="stop (state saved) after this many steps in total")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--threads", type=integer(1), default=None)
    t.add_argument("--device", default="cpu")
    t.set_defaults(func=_cmd_fuse_train)

    b = sub.add_parser(
        "bench-fusion",
        help="time and peak memory per image pair for each fusion network, whole-image and tiled",
    )
    b.add_argument("--size", type=_parse_size, default=(480, 640), help="WIDTHxHEIGHT (default 640x480)")
    b.add_argument("--repeats", type=integer(1), default=3, help="timed runs per configuration (median reported)")
    b.add_argument("--tile", type=integer(0), default=256, help="tile side of the tiled runs (default 256; 0: none)")
    b.add_argument(
        "--methods", type=_method_list, default=",".join(NETWORKS), help="comma-separated (default: the three networks)"
    )
    b.add_argument("--threads", type=integer(1), default=None, help="torch threads per run (default: torch's)")
    b.add_argument(
        "--no-malloc-variant",
        action="store_true",
        help="skip the runs with MALLOC_MMAP_MAX_=0 / MALLOC_TRIM_THRESHOLD_ (glibc keeps freed memory)",
    )
    b.add_argument("--timeout", type=number(0, above=True), default=1800.0, help="seconds per configuration")
    b.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    b.set_defaults(func=_cmd_bench_fusion)

    st = sub.add_parser(
        "bench-fusion-stage",
        help="per-window latency the daemon's [image_fusion] stage adds, next to the SA-CMF path",
    )
    st.add_argument("--size", type=_parse_size, default=(64, 64), help="frame WIDTHxHEIGHT (default 64x64)")
    st.add_argument("--repeats", type=integer(1), default=5)
    st.add_argument("--methods", type=_method_list, default="mean," + ",".join(NETWORKS))
    st.add_argument("--threads", type=integer(1), default=None, help="torch threads (default: torch's)")
    st.add_argument("--checkpoint", default=str(ROOT / "model" / "weights" / "default.pt"), help="SA-CMF checkpoint")
    st.set_defaults(func=_cmd_bench_stage)


def _worker_main(argv: Sequence[str]) -> int:
    """``python -m daemon.fusion_commands bench-worker METHOD H W REPEATS TILE THREADS`` (internal)."""
    if len(argv) != 7 or argv[0] != "bench-worker":
        print("usage: python -m daemon.fusion_commands bench-worker METHOD H W REPEATS TILE THREADS", file=sys.stderr)
        return 2
    _, method, h, w, repeats, tile, threads = argv
    result = bench_worker(method, int(h), int(w), int(repeats), int(tile), int(threads) or None)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
