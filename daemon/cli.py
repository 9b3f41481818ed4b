"""The `sacmf` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from daemon import config as config_mod
from daemon import logs
from daemon.cli_types import integer, number


def _warn_refused_key_files(cfg: config_mod.Config) -> None:
    """Key files serve would refuse one by one (it starts, and admits the other keys)."""
    from ingest.security import scan_authorized_keys

    for curve in (cfg.ingest.curve, cfg.sinks.zmq_curve):
        if curve is not None and curve.authorized_dir is not None:
            for path, why in scan_authorized_keys(curve.authorized_dir)[1].items():
                print(f"warning: {path}: {why}; serve refuses this key (logged, counted as key_file)", file=sys.stderr)


def _check_config(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(args.file)
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ing = cfg.ingest
    summary = f"{args.file}: OK ({ing.transport} on {', '.join(ing.endpoints)}, {'bind' if ing.bind else 'connect'})"
    _warn_refused_key_files(cfg)
    if args.config_only:
        print(f"{summary}; the model and fusion weights were not checked (--config-only)")
        return 0
    if not cfg.model.checkpoint.is_file():  # what serve would refuse at start must not pass here
        print(f"error: [model] checkpoint: no file at {cfg.model.checkpoint}", file=sys.stderr)
        return 2
    from daemon.inference import CheckpointError
    from daemon.service import checkpoint_sha256, make_runner

    if cfg.model.sha256 and (actual := checkpoint_sha256(cfg.model.checkpoint)) != cfg.model.sha256:
        print(
            f"error: [model] checkpoint {cfg.model.checkpoint} has sha256 {actual}, but [model] sha256 expects "
            f"{cfg.model.sha256}: serve would refuse it",
            file=sys.stderr,
        )
        return 2
    runner = make_runner(cfg)
    if getattr(args, "log_level", None) is None:  # its report is the output; the loader's info lines are noise
        logs.configure("warning", getattr(args, "log_format", None) or "auto")
    try:  # read, built and warmed up as serve loads it (loads torch)
        loaded = runner.load()
    except CheckpointError as exc:
        print(f"error: [model] checkpoint: {str(exc)[:600]}", file=sys.stderr)
        return 2
    model_line = (
        f"  model: {loaded.version} (sha256 {loaded.sha256[:12]}), classes {', '.join(loaded.class_names)}; "
        f"trained on {' + '.join(loaded.modalities)}"
    )
    fusion_line = None
    if cfg.image_fusion.method != "none":  # load and warm up the fusion weights as serve would (loads torch)
        from daemon.fusion_stage import FusionLoadError, FusionStage

        try:
            stage = FusionStage.from_settings(cfg.image_fusion)
        except (FusionLoadError, ValueError) as exc:
            print(f"error: [image_fusion] checkpoint: {str(exc)[:600]}", file=sys.stderr)
            return 2
        assert stage is not None
        weights = f"weights sha256 {stage.sha256}" if stage.sha256 else "no weights"
        fusion_line = f"  image fusion: {stage.method.name} ({weights}, warm-up OK), feed {stage.feed}"
    print(summary)
    print(model_line)
    if fusion_line:
        print(fusion_line)
    for g in ing.groups.values():
        w = g.window
        kind = "tumbling" if w.hop_ns is None else f"sliding hop {w.hop_ns / 1e6:g} ms"
        sensors = ", ".join(f"{s}={r}" for s, r in g.sensors.items())
        late = "late data to the late sink"
        if w.late_policy == "update":
            late = f"late data updates windows for {w.update_horizon_ns / 1e6:g} ms"
        print(
            f"  group {g.name}: {sensors}; {w.size_ns / 1e6:g} ms {kind}, lateness {w.allowed_lateness_ns / 1e6:g} ms"
            f", {late}"
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    # SIGHUP's default action ends the process: `systemctl reload` right after start (the unit is
    # Type=exec) would kill the daemon while it loads. Until serve installs its own handlers, a SIGHUP
    # is remembered and honoured as a reload once the daemon is ready.
    early_reload = threading.Event()
    signal.signal(signal.SIGHUP, lambda signum, frame: early_reload.set())
    from daemon import service

    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # [logging] applies unless the command line chose explicitly
    logs.configure(args.log_level or cfg.log_level, args.log_format or cfg.log_format)
    return service.serve(cfg, early_reload)


def _bench_model(args: argparse.Namespace) -> int:
    import torch

    from model.bench import backbone_latency

    torch.set_num_threads(args.threads)
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if not backbones:
        print("error: --backbones: name at least one backbone", file=sys.stderr)
        return 2
    try:
        batches = [integer(1)(b) for b in args.batches.split(",") if b.strip()]
    except argparse.ArgumentTypeError as exc:
        print(f"error: --batches: {exc}", file=sys.stderr)
        return 2
    try:
        rows = backbone_latency(backbones, batches, args.frame_size, args.rounds)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    head = f"SA-CMF forward, eval mode, frame {args.frame_size} px, {args.threads} torch thread(s)"
    print(f"{head}, median of {args.rounds} rounds")
    print("| backbone | params (M) | batch | ms per batch | ms per window | windows/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.backbone} | {r.params_m:.2f} | {r.batch} | {r.ms_per_batch:.2f} | {r.ms_per_window:.2f} "
            f"| {r.windows_per_s:.0f} |"
        )
    return 0


def _sensor_delay(text: str) -> tuple[str, float]:
    """``SENSOR=MS`` for ``--delay``, checked against the simulator's sensor names."""
    from daemon.simulate import SimSettings

    sensors = (*SimSettings.cameras, *SimSettings.radiometers)
    sensor, sep, ms = text.partition("=")
    try:
        value = float(ms)
    except ValueError:
        value = -1.0
    if not sep or sensor not in sensors or not value >= 0:
        names = ", ".join(sensors)
        raise argparse.ArgumentTypeError(f"expected SENSOR=MS with SENSOR in {names} and MS >= 0, got {text!r}")
    return sensor, value


def _frame_size(text: str) -> str:
    """``--size HxW``, checked here and parsed by the simulator."""
    from daemon.simulate import parse_size

    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _group_name(text: str) -> str:
    from ingest.protocol import NAME_RE

    if not NAME_RE.match(text):
        raise argparse.ArgumentTypeError(f"must match [A-Za-z0-9_.-]{{1,64}}, got {text!r}")
    return text


def _bench_ingest(args: argparse.Namespace) -> int:
    from daemon import bench_ingest

    return bench_ingest.main(args)


def _synth(args: argparse.Namespace) -> int:
    from model.synth import SynthConfig, write_dataset

    try:
        cfg = SynthConfig(size=args.frame_size, seq_len=args.seq_len)
        counts = write_dataset(args.out, args.n_train, args.n_val, args.n_test, args.seed, cfg, args.overwrite)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(f'{k}={v}' for k, v in counts.items())} scenes to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import CheckpointError
    from model.sacmf import SACMFConfig
    from model.train import TrainOptions, train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model_cfg = SACMFConfig(
            backbone=args.backbone,
            frame_size=args.frame_size,
            lambda_mi=0.0 if args.no_mi else args.lambda_mi,
            uniform_fusion=args.no_mi,
        )
        opts = TrainOptions(
            data_root=args.data_root,
            val_root=args.val_root,
            out=args.out,
            model=model_cfg,
            batch_size=args.batch_size,
            epochs=args.epochs,
            lr=args.lr,
            weight_decay=args.weight_decay,
            seed=args.seed,
            threads=args.threads,
            device=args.device,
            modalities=args.modalities,
            drop_prob=args.drop_prob,
            max_minutes=args.max_minutes,
            stop_after_epochs=args.stop_after_epochs,
            resume=args.resume,
            overwrite=args.overwrite,
            version=args.version,
        )
        result = train(opts)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # the run diverged: last.pt still holds the last finite epoch
        print(f"error: training diverged: {exc}", file=sys.stderr)
        return 1
    print(f"best epoch {result.best_epoch} (score {result.best_score:.4f}): {result.best_path}")
    return 0


def _test(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import CheckpointError
    from model.infer import run_test

    torch.set_num_threads(args.threads)
    try:
        summary = run_test(
            args.ckpt,
            args.out,
            image_dir=args.image_dir,
            seq_dir=args.seq_dir,
            image_b_dir=args.image_b_dir,
            seq_b_dir=args.seq_b_dir,
            vis=args.vis,
            batch_size=args.batch_size,
            det_threshold=args.det_threshold,
            modalities=args.modalities,
        )
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import CheckpointError
    from model.evaluate import evaluate
    from model.infer import parse_modalities

    torch.set_num_threads(args.threads)
    try:
        mods = parse_modalities(args.modalities) if args.modalities else None
        m = evaluate(
            args.data_root,
            args.ckpt,
            args.out,
            batch_size=args.batch_size,
            repeats=args.repeats,
            det_threshold=args.det_threshold,
            modalities=mods,
        )
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    c, mean_ap = m["classification"], m["detection"]["map"]  # mAP is null when no image was scored
    print(
        f"accuracy {c['accuracy']:.4f} macro-F1 {c['macro_f1']:.4f} "
        f"mAP@0.5 {'n/a' if mean_ap is None else f'{mean_ap:.4f}'}; report: {Path(args.out) / 'report.md'}"
    )
    return 0


def _model_args(p: argparse._SubParsersAction) -> None:
    """synth / train / test / evaluate: the model's offline commands (torch is imported only when run)."""
    y = p.add_parser("synth", help="write a synthetic four-modality dataset (train/val/test splits)")
    y.add_argument("--out", type=Path, default=Path("data"))
    y.add_argument("--n-train", type=integer(0), default=2000)
    y.add_argument("--n-val", type=integer(0), default=500)
    y.add_argument("--n-test", type=integer(0), default=1000)
    y.add_argument("--seed", type=integer(0), default=0)
    y.add_argument("--frame-size", type=integer(1), default=64, help="frame side in px (default 64)")
    y.add_argument("--seq-len", type=integer(1), default=256, help="radiometer samples per scene (default 256)")
    y.add_argument("--overwrite", action="store_true", help="replace existing split directories")
    y.set_defaults(func=_synth)

    t = p.add_parser("train", help="train SA-CMF; writes last.pt, best.pt, metrics.json and curves")
    t.add_argument("--data-root", type=Path, required=True, help="training split directory, e.g. data/train")
    t.add_argument("--val-root", type=Path, default=None, help="validation split directory, e.g. data/val")
    t.add_argument("--out", type=Path, default=Path("checkpoints"))
    t.add_argument("--batch-size", type=integer(2), default=8)
    t.add_argument("--epochs", type=integer(1), default=100)
    t.add_argument("--lr", type=number(0, above=True), default=1e-4)
    t.add_argument("--weight-decay", type=number(0), default=1e-4)
    t.add_argument("--lambda-mi", type=number(0), default=0.1, help="weight of the MI redundancy loss")
    t.add_argument(
        "--backbone", default="mobilenet_v3_small", help="tiny | mobilenet_v3_small | resnet18 | inception_v3"
    )
    t.add_argument("--frame-size", type=integer(4), default=64, help="model input side in px")
    t.add_argument("--modalities", default="image,sequence", help="image,sequence | image | sequence")
    t.add_argument("--no-mi", action="store_true", help="ablation: uniform fusion weights, no MI loss")
    t.add_argument("--drop-prob", type=number(0, 0.99), default=0.3, help="missing-modality augmentation rate")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=integer(1), default=None, help="torch threads (default: torch's choice)")
    t.add_argument("--device", default="cpu", help="cpu (default) or cuda: where to train")
    t.add_argument(
        "--max-minutes", type=number(0, above=True), default=None, help="start no epoch that would end later"
    )
    t.add_argument("--stop-after-epochs", type=integer(1), default=None, help="end this run after N epochs")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt exactly")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in OUT")
    t.add_argument("--version", default="", help="version label stored in the checkpoints")
    t.set_defaults(func=_train)

    def run_args(sp: argparse.ArgumentParser, out: str) -> None:
        sp.add_argument("--ckpt", type=Path, required=True)
        sp.add_argument("--out", type=Path, default=Path(out))
        sp.add_argument("--batch-size", type=integer(1), default=32)
        sp.add_argument("--det-threshold", type=number(0, 1), default=0.3, help="detection score cut, in [0, 1]")
        sp.add_argument("--threads", type=integer(1), default=1, help="torch threads (default 1)")
        sp.add_argument("--modalities", default=None, help="default: what the checkpoint was trained on")

    e = p.add_parser("test", help="run a checkpoint on Image-A/Seq-A folders (B folders beside them)")
    e.add_argument("--image-dir", type=Path, default=None, help="Image-A folder")
    e.add_argument("--seq-dir", type=Path, default=None, help="Seq-A folder")
    e.add_argument("--image-b-dir", type=Path, default=None, help="default: Image-B beside --image-dir")
    e.add_argument("--seq-b-dir", type=Path, default=None, help="default: Seq-B beside --seq-dir")
    e.add_argument("--vis", action="store_true", help="also write detection, heatmap and fusion-weight PNGs")
    run_args(e, "outputs")
    e.set_defaults(func=_test)

    v = p.add_parser("evaluate", help="metrics, report.md and plots of a checkpoint on a labelled split")
    v.add_argument("--data-root", type=Path, required=True, help="labelled split directory, e.g. data/test")
    v.add_argument("--repeats", type=integer(1), default=20, help="timed runs per latency figure (median)")
    run_args(v, "reports/eval")
    v.set_defaults(func=_evaluate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sacmf", description="Streaming SA-CMF recognition of deep-space targets.")
    p.add_argument("--log-level", default=None, choices=list(logs.LEVELS), help="default: info ([logging] for serve)")
    p.add_argument("--log-format", default=None, choices=["auto", "json", "console"], help="default: auto")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("check-config", help="validate a config file and summarise it")
    c.add_argument("file")
    c.add_argument(
        "--config-only",
        action="store_true",
        help="check the file alone (keys, types, values), not the model and fusion weights it names: for "
        "building an image, where they are mounted only when it runs",
    )
    c.set_defaults(func=_check_config)

    def sim_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--group", type=_group_name, default="g1")
        sp.add_argument(
            "--frame-rate", type=number(0, 1000, above=True), default=10.0, help="frames per second per camera"
        )
        sp.add_argument(
            "--sample-rate", type=number(0, 1e6, above=True), default=1000.0, help="radiation samples per second"
        )
        sp.add_argument("--chunk", type=integer(1), default=100, help="samples per radiation message")
        sp.add_argument("--size", type=_frame_size, default="128x128", help="frame size HxW")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--duration", type=number(0, above=True), default=None, help="seconds (default: until Ctrl-C)")
        sp.add_argument(
            "--delay",
            type=_sensor_delay,
            action="append",
            default=[],
            metavar="SENSOR=MS",
            help="send SENSOR's messages MS late (a lagging link: late data, [window] late_policy); repeatable",
        )

    s = sub.add_parser("simulate", help="publish a synthetic sensor group in real time")
    sim_args(s)
    s.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    s.add_argument("--connect", action="store_true", help="connect instead of bind")
    s.add_argument("--socket", default="pub", choices=["pub", "push"], help="pub (live) or push (lossless)")
    # their handlers: daemon/replay_commands.py (register() below), which owns the simulator and the demo

    d = sub.add_parser("demo", help="simulator + daemon with a live console view (the README's main command)")
    sim_args(d)

    v = sub.add_parser("serve", help="run the daemon: ingest -> windows -> SA-CMF -> sinks, admin HTTP")
    v.add_argument("config", nargs="?", default="config.toml", help="config file (default: config.toml)")
    v.set_defaults(func=_serve)

    b = sub.add_parser("bench-ingest", help="benchmark socket -> closed window against bare pyzmq")
    b.add_argument("--seconds", type=number(0, 3600, above=True), default=3.0, help="duration of each measurement")
    b.add_argument("--repeats", type=integer(1), default=3, help="runs per scenario (the median is reported)")
    b.add_argument("--transport", default="ipc", choices=["ipc", "tcp"])
    b.add_argument(
        "--late-policy", default="sink", choices=["sink", "update"], help="[window] late_policy of the measured worker"
    )
    b.set_defaults(func=_bench_ingest)
    m = sub.add_parser("bench-model", help="SA-CMF forward latency per image backbone at batch 1 and 8")
    m.add_argument("--backbones", default="tiny,mobilenet_v3_small,resnet18,inception_v3")
    m.add_argument("--batches", default="1,8")
    m.add_argument("--frame-size", type=integer(4), default=64, help="model input side in px (the default model's)")
    m.add_argument("--rounds", type=integer(1), default=20, help="interleaved timing rounds (the median is reported)")
    m.add_argument("--threads", type=integer(1), default=1, help="torch threads (default 1, as the daemon on 2 cores)")
    m.set_defaults(func=_bench_model)
    _model_args(sub)
    from daemon import fusion_commands  # fuse, fusion-metrics, fuse-train, bench-fusion

    fusion_commands.register(sub)
    from daemon import replay_commands  # replay, evaluate-stream; simulate --record; demo outputs and model

    replay_commands.register(sub)
    from daemon import bench_curve, keygen  # keygen (+ simulate --curve-*), bench-curve: SECURITY.md

    keygen.register(sub)
    bench_curve.register(sub)
    from daemon import soak  # soak: the long run with reconnecting publishers (docs/operations.md)

    soak.register(sub)
    from daemon import bench_daemon  # bench-daemon: serve end to end vs the bare model (BENCHMARKS.md)

    bench_daemon.register(sub)
    from daemon import fuzz_load  # fuzz-load: malformed-message flood against a live daemon (SECURITY.md)

    fuzz_load.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level or "info", args.log_format or "auto")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BrokenPipeError:  # `sacmf check-config x | head -1`: the reader has what it wanted
        logs.to_devnull(sys.stdout.fileno())  # the interpreter's last flush must not raise again
        return 141  # 128 + SIGPIPE, as a shell reports a command stopped by a closed pipe
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM where a command maps it so) in a command without its own
        print("interrupted", file=sys.stderr)  # handling: the finally blocks have run; no traceback
        return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
