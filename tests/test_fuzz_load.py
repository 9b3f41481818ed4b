"""`sacmf fuzz-load`, short: 20,000 malformed messages against a real `sacmf serve` subprocess.

The full run (1,000,000 messages, BENCHMARKS.md) is a command, not a test; this one runs the same code
path end to end (daemon start, real ZeroMQ socket, /metrics, /healthz, SIGTERM) in about ten seconds, so
CI sees a regression in any check the command makes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import zmq

from daemon import cli, fuzz_load
from ingest import fuzzcases, protocol
from tests.service_helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-load") / "tiny.pt"
    tiny_checkpoint(path, "tiny-fuzz-load")
    return path


def test_fuzz_load_short_run(checkpoint: Path, tmp_path: Path) -> None:
    opts = fuzz_load.LoadOptions(messages=20_000, valid_every=10, seed=7, checkpoint=checkpoint, workdir=tmp_path)
    report = fuzz_load.run(opts)
    assert report.ok, fuzz_load.format_report(report)
    expected_checks = {"no_stall", "daemon_alive", "healthz_ok", "healthz_ok_throughout", "rejected_sum",
                       "rejected_by_reason", "valid_delivered", "no_loss", "no_internal_errors", "no_window_lost",
                       "results_after_flood", "clean_shutdown"}  # fmt: skip
    assert set(report.checks) == expected_checks
    # exact accounting: every malformed message under its reason, every valid one delivered
    assert report.malformed_sent == 20_000 == sum(report.rejected.values())
    assert report.rejected == report.expected_reasons
    assert set(report.families) == set(fuzzcases.FAMILIES)  # every family was sent
    # the families reach every reason the decoder and the router can give without CURVE or rate limits
    assert set(report.rejected) == set(protocol.REJECT_REASONS) - {"rate_limited", "unauthorised_group"}
    assert report.valid_delivered == report.valid_expected
    assert sum(report.valid_expected.values()) == report.valid_sent == report.sent_total - 20_000
    assert report.valid_sent >= 20_000 // 9
    assert report.results_after_flood > 0 and report.windows_emitted == report.results_received
    assert report.exit_code == 0 and report.rss_before_mb and report.rss_after_mb


def test_fuzz_load_command_writes_json_and_fails_fast_on_bad_input(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.json"
    argv = ["fuzz-load", "--messages", "2000", "--valid-every", "4", "--seed", "1", "--checkpoint", str(checkpoint),
            "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "2,000 malformed" in text and "all passed" in text
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["malformed_sent"] == 2000 and data["valid_every"] == 4
    assert cli.main(["fuzz-load", "--valid-every", "1", "--checkpoint", str(checkpoint)]) == 2
    assert cli.main(["fuzz-load", "--messages", "10", "--checkpoint", str(tmp_path / "missing.pt")]) == 2


def test_a_daemon_that_takes_nothing_ends_the_flood_instead_of_hanging_it(ctx):
    """PUSH blocks while the receiver is behind; a receiver that never reads must fail the run, not hang it."""

    class Silent:
        def alive(self) -> bool:
            return True

    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 10)
    push.bind("tcp://127.0.0.1:*")
    pull = ctx.socket(zmq.PULL)  # connected, never read: the queues fill, then the sender must give up
    pull.setsockopt(zmq.RCVHWM, 10)
    pull.connect(push.getsockopt_string(zmq.LAST_ENDPOINT))
    send = fuzz_load._lossless_sender(push, 2.0, Silent())  # type: ignore[arg-type]
    t = time.monotonic()
    with pytest.raises(TimeoutError, match="took no message"):
        for _ in range(100_000):
            send([b"rad/g1/rad_vis", b"x" * 1000])
    assert 1.5 < time.monotonic() - t < 30
    push.close(0)
    pull.close(0)
