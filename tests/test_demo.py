"""`sacmf demo` as a user runs it, at its edges: piped into `head`, given bad options, re-run into the
folder of an earlier demo. Real subprocesses, pipes and files.

Each run gets its own TMPDIR, so a temporary folder the demo leaves behind (or makes at all: it needs
none) shows up here and not among other tests' files.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sinks.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
OLD_PICTURE = "g1_1700000000000000000.png"  # named like the daemon's picture sink names them


def demo(tmp_path: Path, *args: str) -> subprocess.Popen:
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "demo", "--frame-rate", "5", *args],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmpdir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def demo_temp_folders(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "tmpdir").glob("sacmf-demo-*"))


def finish(proc: subprocess.Popen, timeout: float, what: str) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"the demo {what} was still running after {timeout} s") from None


def earlier_outputs(out: Path) -> dict[Path, str]:
    """An earlier demo's outputs next to files that are not the demo's (`sacmf test --vis`, the user's)."""
    files = {
        out / "results.jsonl": '{"old": true}\n',
        out / "results.jsonl.1": '{"old": true}\n',
        out / "recording.mcap": "old recording",
        out / "detections" / OLD_PICTURE: "old demo picture",
        out / "detections" / "scene_0001.png": "sacmf test --vis picture",
        out / "predictions.jsonl": "sacmf test output",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


def test_piped_into_head_the_demo_stops_cleanly_and_quietly(tmp_path):
    """`sacmf demo | head -3` used to hang until killed: the console thread died of BrokenPipeError and
    took the --duration/stop checks with it. A closed stdout now stops the demo like Ctrl-C (drain,
    exit 0) with no traceback, long before its --duration."""
    out = tmp_path / "demo"
    proc = demo(tmp_path, "--duration", "300", "--out", str(out))
    head = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()  # what `head -3` does after its third line
    _, err = finish(proc, 60, "piped into a closed stdout")
    assert head[0].startswith("sacmf demo: simulator on tcp://127.0.0.1:")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert (out / "results.jsonl").is_file()  # the daemon opened its sinks and drained
    assert not demo_temp_folders(tmp_path)


BAD_OPTIONS = {  # what: (arguments, {tmp} and {out} filled in; words of the error)
    "missing checkpoint": (["--checkpoint", "{tmp}/nonexistent.pt", "--out", "{out}"], "no checkpoint at"),
    "garbage checkpoint": (["--checkpoint", "{tmp}/bad.pt", "--out", "{out}"], "not a loadable checkpoint"),
    "folder that cannot be made": (["--out", "/proc/sacmf-demo-test"], "cannot use /proc/sacmf-demo-test"),
    "file as the folder": (["--out", "{out}/predictions.jsonl"], "as the output folder"),
}


@pytest.mark.parametrize("what", BAD_OPTIONS)
def test_bad_options_are_refused_before_anything_is_deleted(tmp_path, what):
    """Options are checked before the earlier demo's outputs are replaced and before any temporary folder
    exists: a typo in --checkpoint or --out must not cost the last demo's results, nor leave litter, nor
    end in a traceback, nor print output paths or a scoring command for files that were never written."""
    out = tmp_path / "demo"
    files = earlier_outputs(out)
    (tmp_path / "bad.pt").write_bytes(os.urandom(256))
    args, reason = BAD_OPTIONS[what]
    proc = demo(tmp_path, *(a.format(tmp=tmp_path, out=out) for a in args))
    stdout, err = finish(proc, 60, f"with a {what}")
    assert proc.returncode == 2, err
    assert err.startswith("error: ") and reason in err and "Traceback" not in err, err
    assert "outputs:" not in stdout and "evaluate-stream" not in stdout, stdout
    assert {p: p.read_text() if p.exists() else None for p in files} == files
    assert not demo_temp_folders(tmp_path)


def test_a_second_demo_on_the_same_folder_is_refused_and_touches_nothing(tmp_path):
    """Two demos on one --out (the default, from two terminals): the second deleted the first one's
    files and both wrote one results.jsonl. The folder's lock (held here as a running demo holds it)
    refuses the second."""
    out = tmp_path / "demo"
    files = earlier_outputs(out)
    with open(out / ".demo.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = demo(tmp_path, "--duration", "2", "--out", str(out))
        stdout, err = finish(proc, 60, "beside another")
    assert proc.returncode == 2 and "another sacmf demo is writing to" in err, err
    assert {p: p.read_text() if p.exists() else None for p in files} == files


def test_a_new_demo_replaces_only_the_earlier_demos_own_files(tmp_path):
    """A successful run replaces the earlier demo's results, recording and pictures - and nothing else in
    the folder (`sacmf test --vis` pictures in detections/ survive); it never needs a temporary folder."""
    out = tmp_path / "demo"
    files = earlier_outputs(out)
    proc = demo(tmp_path, "--duration", "2", "--out", str(out))
    temp_folders_seen, lines = set(), []
    for line in iter(proc.stdout.readline, ""):  # while it runs, not only after it has cleaned up
        lines.append(line)
        temp_folders_seen.update(demo_temp_folders(tmp_path))
    stdout, err = finish(proc, 60, "with --duration 2")
    stdout = "".join(lines) + stdout
    assert proc.returncode == 0, err
    assert not temp_folders_seen and not demo_temp_folders(tmp_path)
    for kept in (out / "detections" / "scene_0001.png", out / "predictions.jsonl"):
        assert kept.read_text() == files[kept]
    assert not (out / "detections" / OLD_PICTURE).exists() and not (out / "results.jsonl.1").exists()
    assert all("old" not in r for r in read_jsonl(out / "results.jsonl"))
    assert (out / "recording.mcap").read_bytes() != b"old recording"
    assert f"sacmf evaluate-stream {out}/recording.mcap" in stdout


def test_demo_toml_reads_back_as_the_config_it_was_written_from(tmp_path):
    """Written by hand (no TOML writer dependency): JSON-escaped non-BMP characters such as an emoji in
    the output path gave surrogate escapes, which are not TOML, and the printed command then failed."""
    from daemon.demo import write_demo_config

    out = tmp_path / 'demo-🚀 数据𠀀 "q" back\\slash'
    out.mkdir()
    raw = {
        "ingest": {"mode": "live", "endpoints": ["tcp://127.0.0.1:5555"]},
        "window": {"size_ms": 1000.0, "allowed_lateness_ms": 200},
        "groups": {"g1": {"sensors": {"cam_vis": "image_a", "rad\x7fodd": "seq_a"}}},
        "sinks": {"jsonl_path": str(out / "results.jsonl"), "zmq_bind": False},
    }
    write_demo_config(raw, out / "demo.toml")
    assert tomllib.loads((out / "demo.toml").read_text(encoding="utf-8")) == raw
