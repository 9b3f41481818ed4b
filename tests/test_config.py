"""config.toml validation: the shipped default loads; every kind of mistake names its key."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from daemon import config

ROOT = Path(__file__).resolve().parents[1]


def base() -> dict:
    return tomllib.loads((ROOT / "config.toml").read_text())


def test_default_config_loads():
    cfg = config.load(ROOT / "config.toml")
    g = cfg.ingest.groups["g1"]
    assert set(g.sensors.values()) == {"image_a", "image_b", "seq_a", "seq_b"}
    assert g.window.size_ns == 1_000_000_000 and g.window.hop_ns is None
    assert cfg.ingest.transport == "sub" and cfg.ingest.limits.reject_non_finite
    assert cfg.ingest.max_future_ns == 10_000_000_000  # [ingest] max_future_ms


def test_every_default_key_is_documented_in_config_toml():
    """The default file must show every key with a comment, so the file is the documentation."""
    text = (ROOT / "config.toml").read_text()
    raw = base()
    for section, schema in (("ingest", config.INGEST), ("window", config.WINDOW), ("logging", config.LOGGING)):
        for key in schema:
            assert key in raw[section], f"[{section}] {key} missing from config.toml"
            line_no = next(i for i, line in enumerate(text.splitlines()) if line.startswith(f"{key} ="))
            assert text.splitlines()[line_no - 1].startswith("#"), f"{key} has no comment above it"


def test_serve_sections_are_documented_key_by_key():
    """Same rule for the daemon's sections, matched within each [section] (some key names repeat)."""
    lines = (ROOT / "config.toml").read_text().splitlines()
    raw = base()
    schemas = {"model": config.MODEL, "inference": config.INFERENCE, "sinks": config.SINKS, "admin": config.ADMIN}
    schemas["shutdown"] = config.SHUTDOWN
    section = None
    seen: set[tuple[str, str]] = set()
    for i, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip("[]")
        elif section in schemas and " = " in line and not line.startswith("#"):
            key = line.split(" = ", 1)[0]
            assert key in schemas[section], f"[{section}] {key} is not a known key"
            assert lines[i - 1].startswith("#"), f"[{section}] {key} has no comment above it"
            seen.add((section, key))
    for section, schema in schemas.items():
        for key in schema:
            assert (section, key) in seen and key in raw[section], f"[{section}] {key} missing from config.toml"


def test_serve_settings_are_parsed_and_resolved():
    raw = base()
    cfg = config.parse(raw)
    assert cfg.model.checkpoint == Path("model/weights/default.pt") and cfg.model.device == "cpu"
    assert cfg.inference.policy == "drop_oldest" and cfg.inference.max_delay_s == 0.05  # auto + live
    assert (cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 9102) and cfg.shutdown_timeout_s == 30.0
    assert cfg.sinks.jsonl_path is None and cfg.sinks.zmq_endpoint == "tcp://127.0.0.1:5556"
    raw["ingest"]["mode"] = "replay"
    raw["sinks"].update(zmq_endpoint="", jsonl_path="out/r.jsonl")
    raw["inference"]["latency_buckets_s"] = [1, 0.25]
    cfg = config.parse(raw)
    assert cfg.inference.policy == "block"  # auto + replay: lossless
    assert cfg.sinks.zmq_endpoint is None and cfg.sinks.jsonl_path == Path("out/r.jsonl")
    assert cfg.inference.latency_buckets_s == (0.25, 1.0)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["ingest"].update(endpoint=["x"]), "ingest.endpoint: unknown key"),
        (lambda r: r["model"].update(device="tpu"), "model.device: must be"),
        (lambda r: r["model"].update(det_threshold=1.5), "model.det_threshold: must be in [0, 1]"),
        (lambda r: r["model"].update(torch_threads=-1), "model.torch_threads: must be in 0..1024"),
        (lambda r: r["model"].update(torch_threads=3_000_000_000), "model.torch_threads: must be in 0..1024"),
        (lambda r: r["inference"].update(latency_buckets_s=[0.1, float("nan")]), "positive, finite numbers"),
        (lambda r: r["admin"].update(health_max_age_s=0.4), "admin.health_max_age_s: must be >= 1"),
        # windows that cannot all be open at once overflow, every one of them (live, max_wait off: full lateness)
        (
            lambda r: r["window"].update(size_ms=100, allowed_lateness_ms=10000, max_wait_ms=0),
            "window.max_open_windows: 64 cannot hold the windows open at once",
        ),  # fmt: skip
        (
            lambda r: r["window"].update(size_ms=100, allowed_lateness_ms=10000, max_wait_ms=0),
            "at least 102, or every window would overflow",
        ),  # fmt: skip
        (lambda r: r["window"].update(max_buffered_bytes=10000), "below [ingest] max_message_bytes"),
        (lambda r: r["model"].update(checkpoint=""), "model.checkpoint: must not be empty"),
        (lambda r: r["inference"].update(max_batch_size=0), "inference.max_batch_size: must be > 0"),
        (lambda r: r["inference"].update(queue_size=2), "inference.queue_size: must be >= max_batch_size"),
        (lambda r: r["inference"].update(policy="lifo"), "inference.policy: 'lifo' is not one of"),
        (lambda r: r["inference"].update(latency_buckets_s=[]), "inference.latency_buckets_s: needs"),
        (lambda r: r["inference"].update(latency_buckets_s=[0.5, -1]), "inference.latency_buckets_s: must be"),
        (lambda r: r["sinks"].update(zmq_endpoint="localhost:1"), "sinks.zmq_endpoint: is not a ZeroMQ endpoint"),
        (lambda r: r["ingest"].update(endpoints=["foo://bar"]), "'foo://bar' has an unknown transport 'foo'"),
        (lambda r: r["ingest"].update(endpoints=["tcp://127.0.0.1:notaport"]), "needs tcp://host:port"),
        (lambda r: r["ingest"].update(endpoints=["tcp://127.0.0.1:70000"]), "port in 0..65535"),
        (lambda r: r["sinks"].update(fsync="sometimes"), "sinks.fsync"),
        (lambda r: r["admin"].update(listen="9102"), "admin.listen: listen address"),
        (lambda r: r["admin"].update(tokn="x"), "admin.tokn: unknown key"),
        (lambda r: r["shutdown"].update(timeout_s=0), "shutdown.timeout_s: must be in (0, 86400]"),
        (lambda r: r["shutdown"].update(timeout_s=float("inf")), "shutdown.timeout_s: must be a finite number"),
        (lambda r: r["window"].update(size_ms=float("inf")), "window.size_ms: must be a finite number"),
        (lambda r: r["groups"]["g1"].update(clock_offset_ms={"cam_ir": float("nan")}), "cam_ir: expected a finite"),
        (lambda r: r["ingest"].update(rcvhwm=0), "ingest.rcvhwm: must be in 1..2147483647"),
        (lambda r: r["ingest"].update(rcvhwm=2**31), "ingest.rcvhwm: must be in 1..2147483647"),
        (lambda r: r["model"].update(device="cuda:banana"), "model.device: must be"),
        (lambda r: r["admin"].update(token="s3cret "), "admin.token: must be printable ASCII"),
        (lambda r: r["admin"].update(token="café"), "admin.token: must be printable ASCII"),
        (lambda r: r["admin"].update(listen="*:9102"), "admin.listen: listen address '*:9102'"),
        (lambda r: r.update(security={"allow_ips": ["10.0.0.0/8"]}), "security.allow_ips: needs curve = true"),
        (lambda r: r.update(rate_limit={"groups": {"g1": 0}}), "rate_limit.groups.g1: expected a table"),
        (lambda r: r.update(rate_limit={"sensors": {"g1/cam_ir": 5}}), 'rate_limit.sensors."g1/cam_ir": expected'),
        (lambda r: r.update(image_fusion={"method": "cddfuse", "checkpoint": "/nonexistent/w.pth"}), "does not exist"),
        (lambda r: r.update(extra={}), "unknown section [extra]"),
        (lambda r: r["ingest"].update(bind="yes"), "ingest.bind: expected bool"),
        (lambda r: r["ingest"].update(rcvhwm=True), "ingest.rcvhwm: expected int"),
        (lambda r: r["ingest"].update(mode="fast"), "ingest.mode: 'fast' is not one of"),
        (lambda r: r["ingest"].update(max_message_bytes=0), "ingest.max_message_bytes: must be in 1..2**62"),
        (lambda r: r["ingest"].update(max_future_ms=-1), "ingest.max_future_ms: must be >= 0"),
        (lambda r: r["ingest"].update(endpoints=["localhost:5555"]), "ingest.endpoints"),
        (lambda r: r["window"].update(size_ms=-1), "window.size_ms: must be in (0, 86400000]"),
        (lambda r: r["window"].update(size_ms=1e15), "window.size_ms: must be in (0, 86400000] (one day)"),
        (lambda r: r["window"].update(size_ms=1000, hop_ms=300), "size_ms: must be a multiple of hop_ms"),
        (lambda r: r["window"].update(min_roles=7), "window.min_roles: must be in 1..4"),
        (lambda r: r["window"].update(max_wait_ms=1e-9), "window.max_wait_ms: must be 0 (off) or at least"),
        (
            lambda r: r["groups"]["g1"].update(
                sensors={"cam_vis": "image_a"}, clock_offset_ms={}, window={"min_roles": 2}
            ),
            "min_roles: 2 exceeds the group's 1",
        ),
        (
            lambda r: r["groups"]["g1"].update(
                sensors={"cam_vis": "image_a"}, clock_offset_ms={}, window={"required_roles": ["seq_b"]}
            ),
            "'seq_b' has no sensor",
        ),
        (lambda r: r["window"].update(required_roles=["radar"]), "required_roles: 'radar' is not a role"),
        (lambda r: r["groups"]["g1"]["sensors"].update(cam_vis="image_c"), "groups.g1.sensors.cam_vis: role"),
        (lambda r: r["groups"]["g1"]["sensors"].update(cam_ir="image_a"), "assigned to more than one sensor"),
        (lambda r: r["groups"]["g1"].update(clock_offset_ms={"nope": 1}), "clock_offset_ms.nope: not a sensor"),
        (lambda r: r["groups"]["g1"].update(window={"size_ms": "1s"}), "groups.g1.window.size_ms: expected"),
        (lambda r: r["groups"]["g1"].pop("sensors"), "groups.g1.sensors: required key is missing"),
        (lambda r: r.pop("groups"), "at least one [groups.NAME] table"),
        (lambda r: r["groups"].update({"bad name": r["groups"]["g1"]}), "groups.bad name: group name"),
        (lambda r: r["logging"].update(level="loud"), "logging.level"),
    ],
)
def test_errors_name_the_key(edit, message):
    raw = base()
    edit(raw)
    with pytest.raises(config.ConfigError) as exc:
        config.parse(raw, "c.toml")
    assert message in str(exc.value)


def test_a_group_rate_limit_override_keeps_the_limits_it_does_not_name():
    raw = base()
    raw["rate_limit"] = {"bytes_per_s": 1e6, "burst_s": 2.0, "groups": {"g1": {"messages_per_s": 200}}}
    limit = config.parse(raw).ingest.rate_limits["g1/cam_ir"]
    assert (limit.messages_per_s, limit.bytes_per_s, limit.burst_s) == (200.0, 1e6, 2.0)  # was (200, 0, 1)


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("# caf\xe9\n".encode("latin-1"))
    with pytest.raises(config.ConfigError, match="not UTF-8"):
        config.load(path)


def test_group_window_override_and_offsets():
    raw = base()
    raw["groups"]["g1"]["window"] = {"size_ms": 500, "hop_ms": 250}
    raw["groups"]["g1"]["clock_offset_ms"] = {"cam_ir": -1.5}
    raw["ingest"]["mode"] = "replay"
    g = config.parse(raw).ingest.groups["g1"]
    assert (g.window.size_ns, g.window.hop_ns, g.window.mode, g.window.max_wait_ns) == (
        500_000_000,
        250_000_000,
        "replay",
        0,
    )
    assert g.offsets_ns == {"cam_ir": -1_500_000}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_check_config_cli(tmp_path: Path):
    ok = run_cli("check-config", "config.toml")
    assert ok.returncode == 0 and "OK" in ok.stdout and "group g1" in ok.stdout
    assert "late data to the late sink" in ok.stdout
    update = tmp_path / "update.toml"
    update.write_text((ROOT / "config.toml").read_text().replace('late_policy = "sink"', 'late_policy = "update"'))
    out = run_cli("check-config", str(update))
    assert out.returncode == 0 and "late data updates windows for 5000 ms" in out.stdout
    update.write_text((ROOT / "config.toml").read_text().replace('late_policy = "sink"', 'late_policy = "refire"'))
    out = run_cli("check-config", str(update))
    assert out.returncode == 2 and "window.late_policy" in out.stderr and "'update'" in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "config.toml").read_text().replace("size_ms = 1000", "size_ms = 0"))
    out = run_cli("check-config", str(bad))
    assert out.returncode == 2 and "window.size_ms: must be in (0, 86400000]" in out.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[ingest\n")
    out = run_cli("check-config", str(broken))
    assert out.returncode == 2 and "not valid TOML" in out.stderr
    out = run_cli("check-config", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "cannot read config" in out.stderr
    text = (ROOT / "config.toml").read_text()
    assert 'checkpoint = "model/weights/default.pt"' in text
    no_model = tmp_path / "no_model.toml"  # serve refuses it at start, so check-config must not say OK
    no_model.write_text(text.replace('checkpoint = "model/weights/default.pt"', 'checkpoint = "nowhere.pt"'))
    out = run_cli("check-config", str(no_model))
    assert out.returncode == 2 and "[model] checkpoint: no file at nowhere.pt" in out.stderr
    # serve refuses a checkpoint whose sha256 differs from the pin, and a file that is no checkpoint
    pinned = tmp_path / "pinned.toml"
    pinned.write_text(text.replace('sha256 = ""', 'sha256 = "' + "0" * 64 + '"', 1))
    out = run_cli("check-config", str(pinned))
    assert out.returncode == 2 and "but [model] sha256 expects 000" in out.stderr, out.stderr
    not_a_model = tmp_path / "not_a_model.toml"
    not_a_model.write_text(text.replace('checkpoint = "model/weights/default.pt"', f'checkpoint = "{pinned}"'))
    out = run_cli("check-config", str(not_a_model))
    assert out.returncode == 2 and "error: [model] checkpoint:" in out.stderr and "Traceback" not in out.stderr
    assert "model: sacmf-" in ok.stdout and "trained on image + sequence" in ok.stdout
    assert "model_loaded" not in ok.stderr  # the report is the output
    # weights that load, all finite, but whose forward overflows: serve's warm-up refuses them (exit 2,
    # model_load_failed; it was a main-loop traceback and exit 1), so check-config must not say OK either
    ckpt = torch.load(ROOT / "model" / "weights" / "default.pt", weights_only=True)
    ckpt["state_dict"] = {k: v * 1e30 if v.is_floating_point() and "running_var" not in k and v.abs().max() < 1e6
                          else v for k, v in ckpt["state_dict"].items()}  # fmt: skip
    torch.save(ckpt, tmp_path / "overflow.pt")
    overflow = tmp_path / "overflow.toml"
    overflow.write_text(
        text.replace('checkpoint = "model/weights/default.pt"', f'checkpoint = "{tmp_path}/overflow.pt"')
    )
    out = run_cli("check-config", str(overflow))
    assert out.returncode == 2 and "warm-up forward at batch size 1 failed: FloatingPointError" in out.stderr, (
        out.stderr
    )


def test_help_lists_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("check-config", "simulate", "demo", "bench-ingest", "serve"):
        assert cmd in out.stdout


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        ({"jsonl_path": "out/r.jsonl", "late_path": "out/r.jsonl"}, "sinks.late_path = 'out/r.jsonl': the file"),
        ({"jsonl_path": "out/r.jsonl", "late_path": "out/./r.jsonl.2"}, "also written by sinks.jsonl_path"),
        ({"jsonl_path": "out/r.jsonl", "mcap_path": "out/r.jsonl.1"}, "sinks.mcap_path"),
        ({"mcap_path": "out/x", "png_dir": "out/x"}, "sinks.png_dir"),
        ({"jsonl_path": "out/r.jsonl", "dead_letter": "out/r.jsonl"}, "ingest.dead_letter = 'out/r.jsonl': the file"),
    ],
)
def test_two_sinks_writing_one_file_is_refused(paths, message):
    """Each sink counts only its own bytes: sharing a file (a rotated backup included) breaks rotation
    and lets one sink's clean-up after a failed write cut the other's records."""
    raw = base()
    section = {k: "ingest" if k == "dead_letter" else "sinks" for k in paths}
    raw["sinks"].update({"jsonl_path": "", "late_path": "", "mcap_path": "", "png_dir": ""})
    for k, v in paths.items():
        raw[section[k]][k] = v
    raw["sinks"]["jsonl_backups"] = 3
    with pytest.raises(config.ConfigError, match=message):
        config.parse(raw)
    for k in paths:
        raw[section[k]][k] = f"out/{k}"
    config.parse(raw)  # distinct paths are fine


def test_a_command_piped_into_head_ends_without_a_traceback():
    """`sacmf check-config config.toml | head -1` ended in a BrokenPipeError traceback."""
    import subprocess
    import sys

    run = subprocess.run(
        f"'{sys.executable}' -m daemon.cli --help > /dev/null; '{sys.executable}' -m daemon.cli check-config "
        "config.toml | head -c 10 > /dev/null",
        shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr, run.stderr
