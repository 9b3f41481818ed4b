"""Shared fixtures: real ZeroMQ contexts and endpoints on loopback or ipc in a temp dir."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import zmq

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
_counter = itertools.count()


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request, tmp_path: Path) -> str:
    """A fresh endpoint to bind: tcp loopback on an ephemeral port, or an ipc socket file."""
    if request.param == "tcp":
        yield "tcp://127.0.0.1:*"
        return
    path = Path("/tmp") / f"sacmf-test-{os.getpid()}-{next(_counter)}.ipc"  # ipc paths must be short
    yield f"ipc://{path}"
    path.unlink(missing_ok=True)
