"""Command-line wiring of `sacmf replay`, `sacmf evaluate-stream`, and the recording and demo options of
`sacmf simulate` / `sacmf demo`.

Why one ``register(sub)`` call: ``daemon/cli.py`` is shared by several jobs; keeping these parsers and
handlers here means cli.py only gains one line. ``register`` must run after the ``simulate`` and
``demo`` parsers exist: it adds their new options and points them at the handlers below.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
from pathlib import Path

from daemon import config as config_mod
from daemon import logs
from daemon.cli_types import number, stop_on_signals


def register(sub: argparse._SubParsersAction) -> None:
    """Add `replay` and `evaluate-stream`; extend `simulate` (``--record``) and `demo` (outputs, model)."""
    r = sub.add_parser("replay", help="re-run a recording through ingest and the model (identical at any speed)")
    r.add_argument("recording", help="MCAP file with input messages (sacmf serve [sinks] mcap_path, simulate --record)")
    pace = r.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed", type=number(0, above=True), default=None, help="pace at this multiple of the recorded speed"
    )
    pace.add_argument("--max", action="store_true", help="as fast as possible (the default)")
    _pipeline_args(r)
    r.add_argument("--png", action="store_true", help="also draw pictures (rate-limited) under OUT/")
    r.add_argument("--png-max-per-s", type=float, default=1.0, help="pictures per second per group (with --png)")
    r.set_defaults(func=_replay)

    e = sub.add_parser(
        "evaluate-stream", help="replay a recording with ground truth and score it (JSON, markdown, plots)"
    )
    e.add_argument("recording", help="MCAP file whose messages carry the simulator's truth in meta")
    e.add_argument(
        "--speed", type=number(0, above=True), default=None, help="pace the replay (default: as fast as possible)"
    )
    e.add_argument("--iou", type=number(0, 1, above=True), default=0.5, help="IoU threshold of a detection match")
    _pipeline_args(e)
    e.set_defaults(func=_evaluate)

    s = sub.choices["simulate"]
    s.add_argument("--record", default=None, metavar="FILE", help="also write every published message to this MCAP")
    s.add_argument(
        "--scene-ms", type=number(0, above=True), default=1000.0, help="one scene per this span (the daemon's window)"
    )
    s.set_defaults(func=_simulate, size="64x64")  # the synthetic scenes' native size, what models train on

    d = sub.choices["demo"]
    d.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    d.add_argument("--checkpoint", default=None, help="model to serve (default: model/weights/default.pt)")
    d.add_argument("--no-record", action="store_true", help="do not write outputs/demo/recording.mcap")
    d.set_defaults(func=_demo, size="64x64")  # the model's native frame size: the synthetic scenes look right


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="config.toml", help="groups, windows and model (default: config.toml)")
    p.add_argument("--checkpoint", default=None, help="override [model] checkpoint")
    p.add_argument("--batch", type=int, default=None, help="windows per model call (default: max_batch_size)")
    p.add_argument("--out", default=None, help="output folder (default: outputs/<command>/<recording name>)")


def _out_dir(args: argparse.Namespace, command: str) -> Path | None:
    from daemon.replay import default_output_dir

    out = Path(args.out) if args.out else default_output_dir(args.recording, command)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot use {out} as the output folder: {exc}", file=sys.stderr)
        return None
    return out


def _load(args: argparse.Namespace) -> config_mod.Config | None:
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    if args.checkpoint:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=Path(args.checkpoint)))
    if not cfg.model.checkpoint.is_file():
        print(
            f"error: no model checkpoint at {cfg.model.checkpoint} (--checkpoint or [model] checkpoint)",
            file=sys.stderr,
        )
        return None
    if not Path(args.recording).is_file():
        print(f"error: no recording at {args.recording}", file=sys.stderr)
        return None
    return cfg


def _fusion(cfg: config_mod.Config) -> tuple[bool, object]:
    """(ok, the [image_fusion] stage or None): a replay feeds the model what the daemon would feed it."""
    from daemon.fusion_stage import FusionLoadError, FusionStage

    try:
        return True, FusionStage.from_settings(cfg.image_fusion)
    except FusionLoadError as exc:
        print(f"error: [image_fusion] checkpoint in {cfg.source}: {str(exc)[:600]}", file=sys.stderr)
        return False, None


def _threads(cfg: config_mod.Config) -> None:
    import torch

    from daemon.service import cpu_count

    torch.set_num_threads(cfg.model.torch_threads or max(1, cpu_count() - 1))


def _replay(args: argparse.Namespace) -> int:
    from mcap.exceptions import McapError

    from daemon.replay import replay
    from sinks.jsonl import JsonlSink
    from sinks.png import PngSink

    cfg = _load(args)
    if cfg is None:
        return 2
    _threads(cfg)
    ok, fusion = _fusion(cfg)
    out = _out_dir(args, "replay") if ok else None
    if out is None:
        return 2
    (out / "results.jsonl").unlink(missing_ok=True)
    sink = JsonlSink(out / "results.jsonl", max_bytes=2**40, backups=0, fsync="never")
    png = PngSink(out, max_per_s=args.png_max_per_s) if args.png else None
    try:
        rep = replay(args.recording, cfg, speed=args.speed, batch_size=args.batch, sinks=[sink], png=png, fusion=fusion)
    except McapError as exc:  # not MCAP, or not sacmf's channels
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        sink.close()
    rate = len(rep.results) / rep.wall_s if rep.wall_s > 0 else float("nan")
    pace = "as fast as possible" if args.speed is None else f"at {args.speed:g}x"
    print(
        f"replayed {rep.messages} messages {pace}: {rep.windows} windows ({rep.flushed} flushed at the end), "
        f"{len(rep.results)} results, {sum(rep.rejected.values())} rejected, {len(rep.late)} late, "
        f"{rep.failed} failed; {rep.wall_s:.2f} s ({rate:.1f} windows/s), model {rep.model_version}"
    )
    if fusion is not None:
        print(f"image fusion: {fusion.method.name} ({rep.fusion_failed} window(s) failed their fusion)")
    _warn_unconfigured(rep.rejected, args.config)
    if rep.damage.lost:
        print(
            f"error: the recording is damaged: {rep.damage.describe()}; the results lack their windows", file=sys.stderr
        )
    print(f"results: {out / 'results.jsonl'}" + (f", {png.drawn} pictures under {out}/" if png else ""))
    return 0 if rep.failed == 0 and not rep.damage.lost else 1


def _warn_unconfigured(rejected: dict[str, int], config: str) -> None:
    """Inputs of groups or sensors the config lacks are rejected: name it, or an evaluation of a recording
    made with another config reads as a recording without data ("nothing scored")."""
    unknown = {r: rejected.get(r, 0) for r in ("unknown_group", "unknown_sensor") if rejected.get(r)}
    if unknown:
        counts = ", ".join(f"{n} {r}" for r, n in unknown.items())
        print(
            f"warning: {sum(unknown.values())} recorded input messages name groups or sensors that {config} does not "
            f"configure ({counts}): pass the --config the recording was made with (a demo writes OUT/demo.toml)",
            file=sys.stderr,
        )


def _evaluate(args: argparse.Namespace) -> int:
    from mcap.exceptions import McapError

    from daemon.evaluate_stream import evaluate

    cfg = _load(args)
    if cfg is None:
        return 2
    _threads(cfg)
    ok, fusion = _fusion(cfg)
    out = _out_dir(args, "evaluate-stream") if ok else None
    if out is None:
        return 2
    try:
        ev = evaluate(args.recording, cfg, out, speed=args.speed, batch_size=args.batch, iou=args.iou, fusion=fusion)
    except McapError as exc:  # not MCAP, or not sacmf's channels
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rep = ev.report
    cls, det = rep["classification"], rep["detection"]
    print(f"{rep['windows']} windows replayed, {rep['windows_with_truth']} with ground truth")
    _warn_unconfigured(rep["replay"]["rejected"], args.config)

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    if cls:
        print(f"target class: accuracy {f(cls['accuracy'])}, macro-F1 {f(cls['macro_f1'])}")
    elif rep["replay"]["messages"] == 0:
        print(f"error: no readable input message in {args.recording}: nothing replayed or scored", file=sys.stderr)
    else:
        print("no ground truth in the recording's messages (meta.truth): nothing scored")
    if det:
        a = det["class_agnostic"]
        print(f"detection @IoU {det['iou']}: P {f(a['precision'])} R {f(a['recall'])} F1 {f(a['f1'])} (class-agnostic)")
    live = rep["latency_s"]["live"]
    if live:
        print(f"live latency: p50 {live['p50']:.3f} s, p90 {live['p90']:.3f} s, p99 {live['p99']:.3f} s")
    print(f"report: {out / 'report.md'} (and report.json, {len(rep['plots'])} plots)")
    replayed = rep["replay"]
    if replayed["recording_damage"]:
        print(
            f"error: the recording is damaged: {replayed['recording_damage']}; the windows around the damage were "
            "scored on incomplete input, or not at all",
            file=sys.stderr,
        )
    if replayed["recording_truncated"]:
        print("note: the recording ends cut short (a writer that crashed); its last window was scored on what it holds")
    if replayed["windows_failed"]:
        print(f"error: {replayed['windows_failed']} window(s) failed and are not scored", file=sys.stderr)
    return 1 if replayed["recording_damage"] or replayed["windows_failed"] or replayed["messages"] == 0 else 0


def _simulate(args: argparse.Namespace) -> int:
    from daemon import simulate

    try:
        s = simulate.settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return simulate.publish_command(args, s, stop_on_signals(second_exits=True))


def _demo(args: argparse.Namespace) -> int:
    from daemon import demo, simulate

    level = args.log_level or "warning"  # the live view is the output; info logs would drown it
    logs.configure(level, args.log_format or "auto")
    try:
        settings = simulate.settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return demo.run(
        settings,
        threading.Event(),
        args.duration,
        out_dir=args.out,
        checkpoint=args.checkpoint,
        record=not args.no_record,
        log_level=level,
    )
