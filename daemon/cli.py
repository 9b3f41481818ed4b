"""The `sacmf` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable

from daemon import config as config_mod
from daemon import logs


def _check_config(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(args.file)
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ing = cfg.ingest
    print(f"{args.file}: OK ({ing.transport} on {', '.join(ing.endpoints)}, {'bind' if ing.bind else 'connect'})")
    for g in ing.groups.values():
        w = g.window
        kind = "tumbling" if w.hop_ns is None else f"sliding hop {w.hop_ns / 1e6:g} ms"
        sensors = ", ".join(f"{s}={r}" for s, r in g.sensors.items())
        print(
            f"  group {g.name}: {sensors}; {w.size_ns / 1e6:g} ms {kind}, lateness {w.allowed_lateness_ns / 1e6:g} ms"
        )
    return 0


def _sim_settings(args: argparse.Namespace):
    from daemon.simulate import SimSettings

    h, w = (int(v) for v in args.size.lower().split("x"))
    return SimSettings(
        group=args.group,
        frame_rate_hz=args.frame_rate,
        sample_rate_hz=args.sample_rate,
        chunk_samples=args.chunk,
        height=h,
        width=w,
        seed=args.seed,
    )


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        if stop.is_set():  # second signal: leave at once
            raise SystemExit(130)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _simulate(args: argparse.Namespace) -> int:
    from daemon import simulate
    from ingest.publisher import SensorPublisher

    s = _sim_settings(args)
    stop = threading.Event()
    _stop_on_signals(stop)
    sensors = {c: "img" for c in s.cameras} | {r: "rad" for r in s.radiometers}
    with SensorPublisher(args.endpoint, s.group, sensors, bind=not args.connect, socket_type=args.socket) as pub:
        print(f"publishing group {s.group} on {', '.join(pub.endpoints)} (session {pub.session:#x}); Ctrl-C stops")
        sent = simulate.run(pub, s, stop, args.duration)
    print("sent:", ", ".join(f"{k}={v}" for k, v in sent.items()))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from daemon import demo

    stop = threading.Event()
    _stop_on_signals(stop)
    return demo.run(_sim_settings(args), stop, args.duration)


def _serve(args: argparse.Namespace) -> int:
    from daemon import service

    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # [logging] applies unless the command line chose explicitly
    logs.configure(args.log_level or cfg.log_level, args.log_format or cfg.log_format)
    return service.serve(cfg)


def _bench_ingest(args: argparse.Namespace) -> int:
    from daemon import bench_ingest

    return bench_ingest.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sacmf", description="Streaming SA-CMF recognition of deep-space targets.")
    p.add_argument("--log-level", default=None, choices=list(logs.LEVELS), help="default: info ([logging] for serve)")
    p.add_argument("--log-format", default=None, choices=["auto", "json", "console"], help="default: auto")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("check-config", help="validate a config file and summarise it")
    c.add_argument("file")
    c.set_defaults(func=_check_config)

    def sim_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--group", default="g1")
        sp.add_argument("--frame-rate", type=float, default=10.0, help="frames per second per camera")
        sp.add_argument("--sample-rate", type=float, default=1000.0, help="radiation samples per second")
        sp.add_argument("--chunk", type=int, default=100, help="samples per radiation message")
        sp.add_argument("--size", default="128x128", help="frame size HxW")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--duration", type=float, default=None, help="seconds (default: until Ctrl-C)")

    s = sub.add_parser("simulate", help="publish a synthetic sensor group in real time")
    sim_args(s)
    s.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    s.add_argument("--connect", action="store_true", help="connect instead of bind")
    s.add_argument("--socket", default="pub", choices=["pub", "push"], help="pub (live) or push (lossless)")
    s.set_defaults(func=_simulate)

    d = sub.add_parser("demo", help="simulator -> ingest -> windows, printed as they close")
    sim_args(d)
    d.set_defaults(func=_demo)

    v = sub.add_parser("serve", help="run the daemon: ingest -> windows -> SA-CMF -> sinks, admin HTTP")
    v.add_argument("config", nargs="?", default="config.toml", help="config file (default: config.toml)")
    v.set_defaults(func=_serve)

    b = sub.add_parser("bench-ingest", help="benchmark socket -> closed window against bare pyzmq")
    b.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement")
    b.add_argument("--repeats", type=int, default=3, help="runs per scenario (the median is reported)")
    b.add_argument("--transport", default="ipc", choices=["ipc", "tcp"])
    b.set_defaults(func=_bench_ingest)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level or "info", args.log_format or "auto")
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
