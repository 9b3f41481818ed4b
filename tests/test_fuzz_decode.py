"""The coverage-guided fuzz harness (tests/fuzz/fuzz_decode.py): its properties on the seed corpus, the
regressions it found, and a short deterministic atheris run.

The atheris run needs the ``fuzz`` extra (``make test`` installs it). Without atheris it skips, except under
``CI=true``, where it fails: CI must really fuzz, as it must really run Prometheus.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from ingest import protocol
from tests.fuzz import fuzz_decode as fz

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "fuzz" / "fuzz_decode.py"


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _rad(t_ns: int, dt_ns: int, n: int, seq: int = 0, sensor: str = "rad_vis") -> list[bytes]:
    values = np.arange(n, dtype=np.float32)
    header = protocol.encode_rad_header(fz.GROUP, sensor, 7, seq, t_ns, dt_ns, values)
    return [protocol.topic("rad", fz.GROUP, sensor), header, values.tobytes()]


def test_framing_round_trips_and_accepts_any_bytes():
    messages = [[b"rad/g1/rad_vis", b"\x80", b""], [], [b"x" * 300, b"", b"y", b"z"]]
    assert fz.unpack_input(fz.pack_input(messages, flags=5)) == (5, messages)
    assert fz.unpack_input(b"") == (0, [])
    assert fz.unpack_input(b"\x01\x02\x05\x00ab") == (1, [[b"ab", b""]])  # lengths past the end: what is left
    with pytest.raises(ValueError):
        fz.pack_input([[b""] * 8])


def test_seed_corpus_satisfies_every_property():
    seeds = list(fz.seed_inputs())
    assert len(seeds) > 30
    for data in seeds:
        fz.run_input(data)  # raises on any broken property
    assert len(fz.dictionary_tokens()) > 40


def test_mutated_seeds_satisfy_every_property():
    """A cheap, atheris-free stand-in for the fuzzer: byte flips and truncations of every seed."""
    rng = np.random.default_rng(0)
    for data in fz.seed_inputs():
        for _ in range(20):
            b = bytearray(data)
            for _ in range(int(rng.integers(1, 4))):
                b[int(rng.integers(1, len(b)))] = int(rng.integers(0, 256))
            fz.run_input(bytes(b[: int(rng.integers(1, len(b) + 1))]))


def test_regression_last_sample_time_must_be_int64():
    """Found by the fuzzer (the harness's own property): a radiation message whose later samples lie beyond
    int64 (t_ns near 2^63, any n > 1) was accepted, while windows keep sample times in int64 arrays, where
    they silently wrap to negative times (or raise OverflowError once a window starts beyond int64). Now it
    is rejected as field_type."""
    t_max = protocol.INT64_MAX
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.decode(_rad(t_max - 5, 1_000_000, 10))
    assert exc.value.reason == "field_type"
    assert protocol.decode(_rad(t_max - 9, 1, 10)).data.shape == (10,)  # the last sample exactly at INT64_MAX
    assert protocol.decode(_rad(t_max, 10**18, 1)).t_ns == t_max  # one sample: no span at all
    fz.run_input(fz.pack_input([_rad(fz.T0, 10**6, 4), _rad(t_max - 2, 1, 3, seq=1), _rad(t_max - 2, 1, 4, seq=2)]))


def test_regression_sparse_chunk_does_not_stall_the_worker():
    """Found by the fuzzer (a libFuzzer timeout, one ChangeBinInt away from the slow-radiometer seed): a
    radiation chunk of 3 samples with dt_ns = 648519356363698688 (20 years) made the window code walk every
    1 s window between its samples, about 1.3e9 iterations: hours of a stalled ingest loop for one valid
    message. Now the cost follows the samples, not the time span. (Years apart here, so that a regression
    fails in seconds instead of hanging.)"""
    year = 365 * 86400 * fz.SEC
    for flags in (0, fz.FLAG_LIVE, fz.FLAG_SLIDING, fz.FLAG_LIVE | fz.FLAG_SLIDING):
        t = time.perf_counter()
        fz.run_input(fz.pack_input([_rad(fz.T0 - year, year // 2, 3), _rad(fz.T0, fz.SEC // 3, 7, seq=1)], flags))
        fz.run_input(fz.pack_input([_rad(fz.T0, fz.SEC // 3, 7), _rad(fz.T0 - year, year // 2, 3, seq=1)], flags))
        assert time.perf_counter() - t < 2.0, flags
    windows: list = []
    worker = fz.make_worker(0, windows)
    worker.handle(_rad(fz.T0, year, 3), 0, fz.T0)
    worker.flush()
    assert [w.start_ns for w in windows] == [fz.T0, fz.T0 + year, fz.T0 + 2 * year]  # one per sample, none between
    assert [w.samples["seq_a"].t_ns.tolist() for w in windows] == [[fz.T0], [fz.T0 + year], [fz.T0 + 2 * year]]


def test_atheris_fuzz_run(tmp_path: Path):
    """A few thousand coverage-guided inputs from the seed corpus, deterministic (libFuzzer -seed)."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        reason = "atheris not installed (pip install -e '.[fuzz]'; `make test` installs it)"
        if _ci():
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    corpus = tmp_path / "corpus"
    cmd = [sys.executable, str(HARNESS), "-atheris_runs=4000", "-seed=1", "-timeout=20",
           f"-artifact_prefix={tmp_path}/", str(corpus)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Done 4000" in out, out[-2000:]
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))
    assert len(list(corpus.iterdir())) > len(list(fz.seed_inputs()))  # it learned inputs beyond the seeds


def test_meta_is_bounded_after_decoding():
    """meta re-encodes within the limit whenever it is accepted, whatever the header's own encoding."""
    header = msgpack.unpackb(_rad(fz.T0, 1, 2)[1])
    header["meta"] = {"k": "x" * (protocol.MAX_META_BYTES - 20)}
    frames = _rad(fz.T0, 1, 2)
    frames[1] = msgpack.packb(header)
    m = protocol.decode(frames)
    fz.check_message(m, frames, protocol.Limits())
