"""CURVE, ZAP, group allow-lists, key files, admin tokens and pinned checkpoints, over real sockets.

Every test here pits authorised parties against refused ones at the same time: the point is not only
that intruders are kept out, but that the authorised stream flows on with exact counts while they try.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import stat
import threading
import time
import tomllib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import structlog
import zmq
import zmq.auth
from zmq.utils import z85

from daemon import config as config_mod
from daemon import keygen, service
from daemon.admin import AdminHandlers, AdminServer
from daemon.cli import build_parser
from ingest import protocol, security
from ingest.publisher import SensorPublisher
from ingest.settings import GroupSettings, IngestSettings
from ingest.windowing import WindowSpec
from sinks.zmq_pub import ZmqResultPublisher
from tests.http_helpers import status as _get
from tests.ingest_helpers import SEC, T0, WorkerThread, wait_for
from tests.test_sinks import make_result

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = np.linspace(0.0, 1.0, 10, dtype=np.float32)


@dataclasses.dataclass
class Keys:
    root: Path
    sensors: Path  # admitted sensor keys: cam, other
    readers: Path  # admitted result readers: reader
    daemon_dir: Path  # what a binding publisher admits: the daemon's key

    def secret(self, name: str) -> Path:
        return self.root / f"{name}.key_secret"

    def public(self, name: str) -> Path:
        return self.root / f"{name}.key"

    def pair(self, name: str) -> security.KeyPair:
        return security.load_secret_certificate(self.secret(name))


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    root = tmp_path / "keys"
    for name in ("daemon", "cam", "other", "intruder", "reader", "stranger"):
        keygen.generate(name, root)
    k = Keys(root, root / "sensors", root / "readers", root / "for_publishers")
    for directory, names in ((k.sensors, ("cam", "other")), (k.readers, ("reader",)), (k.daemon_dir, ("daemon",))):
        directory.mkdir(mode=0o755)
        for name in names:
            (directory / f"{name}.key").write_bytes(k.public(name).read_bytes())
    return k


def _rad(group: str, sensor: str, seq: int, session: int = 7) -> list[bytes]:
    header = protocol.encode_rad_header(group, sensor, session, seq, T0 + seq * SEC // 10, 1_000_000, SAMPLES, None)
    return [protocol.topic("rad", group, sensor), header, SAMPLES.tobytes()]


def _spec(mode: str) -> WindowSpec:
    return WindowSpec(size_ns=SEC, allowed_lateness_ns=10 * SEC, idle_timeout_ns=60 * SEC, mode=mode)


def _client(ctx: zmq.Context, kind: int, ep: str, keys: Keys | None, name: str | None) -> zmq.Socket:
    """A raw socket connecting with ``name``'s key pair pinned to the daemon's key, or without CURVE."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None and name is not None:
        security.make_client(sock, keys.pair(name), keys.pair("daemon").public)
    sock.connect(ep)
    return sock


def _null_refusals(auth: security.ZapHandler) -> int:
    """A peer without CURVE shows as a mechanism mismatch, or as a bare handshake failure when its side
    noticed the mismatch first and hung up: which one is a race inside libzmq."""
    return auth.rejected["mechanism"] + auth.rejected["handshake"]


def _probe(send, arrived, timeout: float = 20.0) -> None:
    """Send until something arrives: PUB drops whatever it sends before the subscription reaches it."""
    deadline = time.monotonic() + timeout
    while not arrived():
        assert time.monotonic() < deadline, "nothing arrived: the authorised publisher never got through"
        send()
        time.sleep(0.02)


def _settle(count, expected: int, what: str) -> None:
    """Wait for ``expected``, then make sure nothing more trickles in."""
    wait_for(lambda: count() >= expected, what=what)
    time.sleep(0.3)
    assert count() == expected, what


# ----------------------------------------------------------------------------------------------------
# Key files
# ----------------------------------------------------------------------------------------------------


def test_keygen_writes_standard_certificates_with_a_private_secret(tmp_path: Path, capsys) -> None:
    public, secret = keygen.generate("cam-1", tmp_path / "k")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o644
    pub, sec = zmq.auth.load_certificate(secret)
    assert zmq.auth.load_certificate(public) == (pub, None)
    assert zmq.curve_public(sec) == pub  # a real key pair, not two random strings
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["cam-1.key", "cam-1.key_secret"]
    with pytest.raises(FileExistsError, match="never overwritten"):
        keygen.generate("cam-1", tmp_path / "k")
    assert zmq.auth.load_certificate(secret) == (pub, sec)  # untouched by the refused attempt
    with pytest.raises(ValueError, match="must match"):
        keygen.generate("../escape", tmp_path / "k")

    args = build_parser().parse_args(["keygen", "daemon", "--dir", str(tmp_path / "k")])
    assert args.func(args) == 0
    assert "daemon.key_secret" in capsys.readouterr().out
    assert args.func(args) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--curve-clients", "--curve-server-public"])
def test_simulate_asked_for_curve_without_its_secret_is_a_usage_error(keys: Keys, option: str, capsys) -> None:
    """It published in plaintext, exit 0: an operator who asked for CURVE would not notice."""
    args = build_parser().parse_args(["simulate", "--duration", "0.1", option, str(keys.daemon_dir)])
    with pytest.raises(SystemExit) as exc:
        args.func(args)
    assert exc.value.code == 2 and "need --curve-secret" in capsys.readouterr().err


def test_loose_key_permissions_are_refused_naming_the_file_and_mode(keys: Keys) -> None:
    secret = keys.secret("cam")
    os.chmod(secret, 0o640)
    with pytest.raises(security.KeyFileError, match=rf"{secret}: secret key file has mode 0640"):
        security.load_secret_certificate(secret)
    with pytest.raises(security.KeyFileError, match="0640"):
        SensorPublisher("tcp://127.0.0.1:1", "g1", {"rad_vis": "rad"}, bind=False, curve_secret=secret)
    os.chmod(secret, 0o600)
    assert security.load_secret_certificate(secret).name == "cam"

    os.chmod(keys.sensors, 0o775)  # group-writable: anyone in the group could admit themselves
    with pytest.raises(security.KeyFileError, match=rf"{keys.sensors}: directory of admitted keys has mode 0775"):
        security.scan_checked_directory(keys.sensors)
    os.chmod(keys.sensors, 0o755)
    public_only = keys.public("cam").rename(keys.root / "pub_as.key_secret")
    os.chmod(public_only, 0o600)
    with pytest.raises(security.KeyFileError, match="holds no secret key"):
        security.load_secret_certificate(public_only)


# ----------------------------------------------------------------------------------------------------
# The ZAP handler's decisions (RFC 27 requests, as libzmq sends them)
# ----------------------------------------------------------------------------------------------------


def _zap(keys: Keys, name: str, address: str = "10.1.2.3", mechanism: bytes = b"CURVE") -> list[bytes]:
    raw = z85.decode(keys.pair(name).public)
    return [b"1.0", b"42", b"sacmf", address.encode(), b"", mechanism, raw]


def test_zap_handler_admits_by_directory_names_keys_and_sees_changes_without_restart(keys: Keys) -> None:
    ctx = zmq.Context()
    try:
        h = security.ZapHandler(ctx, keys.sensors, deny_ips=["10.9.0.0/16"])
        assert h.answer(_zap(keys, "cam")) == [b"1.0", b"42", b"200", b"OK", b"cam", b""]  # User-Id = name
        assert h.answer(_zap(keys, "intruder"))[2:4] == [b"400", b"unknown key"]
        assert h.answer(_zap(keys, "cam", address="10.9.8.7"))[2] == b"400"  # denied network
        assert h.answer(_zap(keys, "cam", mechanism=b"PLAIN"))[2] == b"400"
        assert (h.rejected["unknown_key"], h.rejected["address"], h.rejected["bad_request"]) == (1, 1, 1)

        (keys.sensors / "intruder.key").write_bytes(keys.public("intruder").read_bytes())  # added: admitted
        assert h.answer(_zap(keys, "intruder"))[2:5] == [b"200", b"OK", b"intruder"]
        (keys.sensors / "cam.key").write_bytes(keys.public("stranger").read_bytes())  # rewritten in place
        assert h.answer(_zap(keys, "cam"))[2] == b"400"  # the old key is out at its next handshake
        assert h.answer(_zap(keys, "stranger"))[2:5] == [b"200", b"OK", b"cam"]  # the new one has its name
        (keys.sensors / "intruder.key").unlink()  # revoked
        assert h.answer(_zap(keys, "intruder"))[2] == b"400"
        assert h.rejected["unknown_key"] == 3 and h.admitted == 3

        allow = security.ZapHandler(ctx, keys.sensors, allow_ips=["127.0.0.0/8", "::1"])
        assert allow.answer(_zap(keys, "other", address="127.0.0.1"))[2] == b"200"
        assert allow.answer(_zap(keys, "other", address="192.168.1.1"))[2] == b"400"
        assert allow.answer(_zap(keys, "other", address=""))[2] == b"400"  # ipc peers have no IP to allow
    finally:
        ctx.term()


def _handshake(port: int, keys: Keys, name: str, server: zmq.Socket) -> bytes | None:
    """A fresh CURVE client with ``name``'s key sends one message to ``server`` (a PULL with RCVTIMEO):
    what arrived, or None when ZAP refused the handshake (a refused client never gets a message through)."""
    client_ctx = zmq.Context()
    try:
        push = _client(client_ctx, zmq.PUSH, f"tcp://127.0.0.1:{port}", keys, name)
        push.send(name.encode())
        try:
            return server.recv()
        except zmq.Again:
            return None
    finally:
        client_ctx.destroy(linger=0)


def test_a_bad_key_file_at_start_is_refused_alone_and_serve_still_starts(keys: Keys, tmp_path: Path, capsys) -> None:
    """Tolerated while serving, a stray bad certificate made the next restart exit 2, cutting every sensor."""
    (keys.sensors / "new-cam.key").write_text("not a certificate\n")
    ctx = zmq.Context()
    try:
        with structlog.testing.capture_logs() as logs:
            h = security.ZapHandler(ctx, keys.sensors)
        assert sorted(h.keys.values()) == ["cam", "other"] and h.rejected["key_file"] == 1
        assert [e["file"] for e in logs if e["event"] == "curve_key_file_refused"] == [
            str(keys.sensors / "new-cam.key")
        ]
        assert h.answer(_zap(keys, "cam"))[2] == b"200"
    finally:
        ctx.term()
    cfg_path = tmp_path / "c.toml"
    paths = {
        "secret_key": keys.secret("daemon"),
        "authorized_sensors": keys.sensors,
        "authorized_readers": keys.readers,
    }
    cfg_path.write_text(
        '[ingest]\nbind = true\n[groups.g1]\nsensors = { cam_vis = "image_a" }\n[security]\ncurve = true\n'
        + "".join(f'{key} = "{path}"\n' for key, path in paths.items())
    )
    config_mod.load(cfg_path)  # serve's parse: no error
    args = build_parser().parse_args(["check-config", str(cfg_path), "--config-only"])
    assert args.func(args) == 0
    assert "new-cam.key: not a ZeroMQ certificate" in capsys.readouterr().err  # but said
    (keys.sensors / "new-cam.key").unlink()
    os.chmod(keys.sensors, 0o777)  # a directory others may write stays a start-up error
    with pytest.raises(config_mod.ConfigError, match="authorized_sensors"):
        config_mod.load(cfg_path)


def test_a_grant_by_z85_key_to_a_refused_file_is_no_typo_and_serve_still_starts(keys: Keys, tmp_path: Path) -> None:
    """Granting by Z85 public key (a documented form) a key whose file is refused (loose mode, a second
    copy) made the config error "not among the known keys" and serve exit 2, cutting every sensor."""
    other = keys.pair("other").public.decode()
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(
        '[ingest]\nbind = true\n[groups.g1]\nsensors = { cam_vis = "image_a" }\n[groups.g2]\n'
        'sensors = { cam_ir = "image_b" }\n[security]\ncurve = true\n'
        f'secret_key = "{keys.secret("daemon")}"\nauthorized_sensors = "{keys.sensors}"\n'
        f'authorized_readers = "{keys.readers}"\nsensor_groups = {{ cam = ["g1"], "{other}" = ["g2"] }}\n'
    )
    for breakage in ("loose", "copy"):
        if breakage == "loose":
            os.chmod(keys.sensors / "other.key", 0o666)
        else:
            os.chmod(keys.sensors / "other.key", 0o644)
            (keys.sensors / "other-copy.key").write_bytes((keys.sensors / "other.key").read_bytes())
        config_mod.load(cfg_path)  # no error: serve starts
        known, problems = security.scan_checked_directory(keys.sensors)
        acl = security.resolve_groups({"cam": ["g1"], other: ["g2"]}, known, security.refused_key_names(problems))
        expected = {"cam": frozenset({b"g1"}), "other": frozenset({b"g2"})}
        if breakage == "copy":
            expected["other-copy"] = frozenset({b"g2"})  # whichever file stays keeps the grant
        assert acl == expected, breakage
    with pytest.raises(security.KeyFileError, match="not among the known keys"):  # a real typo still is one
        security.resolve_groups({keys.pair("intruder").public.decode(): ["g1"]}, known, {})


def test_revoking_a_key_takes_effect_even_beside_a_bad_new_key_file(keys: Keys) -> None:
    """Deleting a key file must refuse that key at its next handshake whatever else is in the directory.

    The bug: one bad file (an operator's loose umask on a newly added key, or a file that is not a
    certificate) made the whole re-read fail and the handler kept its last good set, so a deleted key
    stayed admitted, silently. Now each file stands alone: the revoked key is refused, the bad files are
    refused and reported by name (counted as reason key_file, once each), the other key keeps working."""
    ctx = zmq.Context()
    server = ctx.socket(zmq.PULL)
    server.setsockopt(zmq.LINGER, 0)
    server.setsockopt(zmq.RCVTIMEO, 1000)
    auth = security.ZapHandler(ctx, keys.sensors)
    try:
        security.make_server(server, keys.pair("daemon"))
        auth.watch(server)
        auth.start()
        port = server.bind_to_random_port("tcp://127.0.0.1")
        assert _handshake(port, keys, "cam", server) == b"cam"

        loose = keys.sensors / "stranger.key"  # a new key added with umask 002: group-writable
        loose.write_bytes(keys.public("stranger").read_bytes())
        os.chmod(loose, 0o664)
        (keys.sensors / "notes.key").write_text("not a certificate\n")
        (keys.sensors / "cam.key").unlink()  # revoked

        assert _handshake(port, keys, "cam", server) is None
        assert _handshake(port, keys, "other", server) == b"other"  # untouched by the bad files beside it
        assert _handshake(port, keys, "stranger", server) is None  # its file is refused, not half-trusted
        assert auth.rejected["unknown_key"] == 2 and auth.admitted == 2
        assert auth.rejected["key_file"] == 2  # each bad file once, not once per handshake
        assert set(auth.refused_files) == {str(loose), str(keys.sensors / "notes.key")}
        assert "mode 0664" in auth.refused_files[str(loose)] and "chmod go-w" in auth.refused_files[str(loose)]

        os.chmod(loose, 0o644)  # fixed: admitted at its next handshake, and no longer reported
        assert _handshake(port, keys, "stranger", server) == b"stranger"
        assert set(auth.refused_files) == {str(keys.sensors / "notes.key")}
    finally:
        server.close(linger=0)
        auth.stop()
        ctx.term()


def test_key_directory_problems_never_keep_a_removed_key_nor_admit_an_unchecked_one(keys: Keys) -> None:
    """The other ways the directory can go wrong while the daemon runs, decided as ZAP requests.

    A directory others may write cannot vouch for a new file (whoever can write it admits themselves),
    so nothing is added then; but deletions and rewrites still apply, so revoking never waits for the
    permissions to be fixed. Two files with one key are ambiguous: the name that already held the key
    keeps it. A rewritten file that no longer loads admits nothing."""
    ctx = zmq.Context()
    try:
        h = security.ZapHandler(ctx, keys.sensors)
        assert h.answer(_zap(keys, "cam"))[2] == b"200" and h.answer(_zap(keys, "other"))[2] == b"200"

        os.chmod(keys.sensors, 0o775)  # group-writable
        (keys.sensors / "intruder.key").write_bytes(keys.public("intruder").read_bytes())
        (keys.sensors / "cam.key").unlink()
        assert h.answer(_zap(keys, "cam"))[2] == b"400"  # removed: refused at once
        assert h.answer(_zap(keys, "intruder"))[2] == b"400"  # added to a directory others may write
        assert h.answer(_zap(keys, "other"))[2:5] == [b"200", b"OK", b"other"]
        assert list(h.refused_files) == [str(keys.sensors)] and "0775" in h.refused_files[str(keys.sensors)]
        os.chmod(keys.sensors, 0o755)
        assert h.answer(_zap(keys, "intruder"))[2:5] == [b"200", b"OK", b"intruder"]  # fixed: now it counts

        (keys.sensors / "alias.key").write_bytes(keys.public("other").read_bytes())  # a second name for other
        assert h.answer(_zap(keys, "other"))[2:5] == [b"200", b"OK", b"other"]  # the name its grants know
        assert list(h.refused_files) == [str(keys.sensors / "alias.key")]
        assert "same public key as other.key" in h.refused_files[str(keys.sensors / "alias.key")]

        (keys.sensors / "intruder.key").write_text("garbage\n")  # rewritten in place, badly
        assert h.answer(_zap(keys, "intruder"))[2] == b"400"
        assert h.rejected["key_file"] == 3 and h.rejected["unknown_key"] == 3
    finally:
        ctx.term()


# ----------------------------------------------------------------------------------------------------
# Sensor input: the daemon binds (CURVE server), publishers connect
# ----------------------------------------------------------------------------------------------------


def test_bind_topology_admits_only_authorised_keys_into_their_own_groups(keys: Keys, ctx: zmq.Context) -> None:
    curve = security.CurveConfig(
        keys.secret("daemon"), authorized_dir=keys.sensors, groups={"cam": ("g1",), "other": ("g2",)}
    )
    groups = {
        "g1": GroupSettings("g1", {"rad_vis": "seq_a", "rad_ir": "seq_b"}, _spec("live")),
        "g2": GroupSettings("g2", {"rad_vis": "seq_a"}, _spec("live")),
    }
    s = IngestSettings(("tcp://127.0.0.1:*",), groups, bind=True, transport="sub", curve=curve)
    wt = WorkerThread(s, ctx).start()
    w = wt.worker
    ep = wt.endpoint
    others = zmq.Context()
    try:
        plain = _client(others, zmq.PUB, ep, None, None)  # no CURVE at all
        intruder = _client(others, zmq.PUB, ep, keys, "intruder")  # a key the daemon does not know
        wrong = _client(others, zmq.PUB, ep, keys, "other")  # admitted, but granted g2 only
        good = SensorPublisher(
            ep,
            "g1",
            {"rad_vis": "rad"},
            bind=False,
            context=others,
            heartbeat_interval=1.0,
            curve_secret=keys.secret("cam"),
            curve_server_public=keys.public("daemon"),
        )
        # PUB drops what it sends before the subscription reaches it: probe until each admitted one flows
        _probe(good.heartbeat, lambda: w.messages()["g1", "rad_vis", "hb"] > 0)
        sent = iter(range(10**6))
        _probe(
            lambda: wrong.send_multipart(_rad("g2", "rad_vis", next(sent))),
            lambda: w.messages()["g2", "rad_vis", "rad"],
        )
        probes = next(sent)
        time.sleep(0.3)
        base_g2 = w.messages()["g2", "rad_vis", "rad"]
        wait_for(lambda: w.auth.rejected["unknown_key"] >= 1 and _null_refusals(w.auth) >= 1, what="refusals")

        n, m = 40, 9
        for i in range(n):
            good.send_samples("rad_vis", SAMPLES, T0 + i * SEC // 10, 1_000_000)
            plain.send_multipart(_rad("g1", "rad_ir", i))
            intruder.send_multipart(_rad("g1", "rad_ir", i))
            if i < m:
                wrong.send_multipart(_rad("g1", "rad_ir", i))  # into a group it was not granted
                wrong.send_multipart(_rad("g2", "rad_vis", probes + i))  # its own group still works
        _settle(lambda: w.messages()["g1", "rad_vis", "rad"], n, "the authorised stream")
        _settle(lambda: w.stats.rejected["unauthorised_group"], m, "unauthorised_group rejections")
        _settle(lambda: w.messages()["g2", "rad_vis", "rad"], base_g2 + m, "the other key's own group")
        assert w.tracker.snapshot()["g1/rad_vis"].gaps_detected == 0
        assert w.messages()["g1", "rad_ir", "rad"] == 0 and w.messages()["g1", "rad_ir", "hb"] == 0
        assert dict(+w.stats.rejected) == {"unauthorised_group": m}
        assert w.auth.admitted >= 2  # cam and other
        good.close()
    finally:
        wt.finish()
        others.destroy(linger=0)


# ----------------------------------------------------------------------------------------------------
# Replay input: publishers bind (CURVE servers), the daemon connects with each one's server key pinned
# ----------------------------------------------------------------------------------------------------


def _server_push(keys: Keys, name: str | None) -> tuple[zmq.Context, zmq.Socket, security.ZapHandler | None]:
    """A raw publisher that binds as a CURVE server admitting the daemon (or binds without CURVE)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    auth = None
    if name is not None:
        security.make_server(sock, keys.pair(name))
        auth = security.ZapHandler(ctx, keys.daemon_dir, socket_name=name).start()
    sock.bind("tcp://127.0.0.1:*")
    return ctx, sock, auth


def test_connect_topology_pins_each_publisher_and_checks_its_groups(keys: Keys, ctx: zmq.Context) -> None:
    good = SensorPublisher(
        "tcp://127.0.0.1:*",
        "g1",
        {"rad_vis": "rad"},
        socket_type="push",
        heartbeat_interval=1.0,
        curve_secret=keys.secret("cam"),
        curve_clients=keys.daemon_dir,
    )
    servers = (("wrong", "other"), ("impostor", "intruder"), ("plain", None))
    raw = {name: _server_push(keys, key) for name, key in servers}
    eps = {"good": good.endpoints[0]} | {n: r[1].getsockopt_string(zmq.LAST_ENDPOINT) for n, r in raw.items()}
    pins = {"good": "cam", "wrong": "other", "impostor": "cam", "plain": "cam"}  # the impostor does not hold cam
    curve = security.CurveConfig(
        keys.secret("daemon"),
        server_keys={eps[n]: keys.public(k) for n, k in pins.items()},
        groups={"cam": ("g1",), "other": ("g2",)},
    )
    groups = {"g1": GroupSettings("g1", {"rad_vis": "seq_a", "rad_ir": "seq_b"}, _spec("replay"))}
    s = IngestSettings(tuple(eps.values()), groups, bind=False, transport="pull", curve=curve)
    started = time.monotonic()
    wt = WorkerThread(s, ctx).start()
    w = wt.worker
    try:
        n, m = 30, 6
        for i in range(n):
            good.send_samples("rad_vis", SAMPLES, T0 + i * SEC // 10, 1_000_000)
        for i in range(m):
            raw["wrong"][1].send_multipart(_rad("g1", "rad_ir", i))  # lossless PUSH: each one arrives
        for name in ("impostor", "plain"):  # no handshake completes: they cannot even hand a message over
            with pytest.raises(zmq.Again):
                raw[name][1].send_multipart(_rad("g1", "rad_ir", 0), flags=zmq.NOBLOCK)
        _settle(lambda: w.messages()["g1", "rad_vis", "rad"], n, "the pinned publisher's stream")
        _settle(lambda: w.stats.rejected["unauthorised_group"], m, "unauthorised_group rejections")
        assert dict(+w.stats.rejected) == {"unauthorised_group": m}
        assert w.messages()["g1", "rad_ir", "rad"] == 0
        assert good._auth is not None and good._auth.admitted == 1  # the daemon, by its key
        assert raw["impostor"][2] is not None and raw["impostor"][2].admitted == 0
        # The impostor's and the plain publisher's refused handshakes are counted as refusals (they read as
        # connection drops with a wrong hint, 20 a second) and retried after 0.5 s, 1 s, 2 s, ...
        time.sleep(max(0.0, 3.0 - (time.monotonic() - started)))
        refused = w.auth_rejected()
        assert refused["handshake"] >= 1 and refused["handshake"] + refused["mechanism"] >= 2, refused
        assert refused["handshake"] + refused["mechanism"] <= 16, refused  # libzmq alone retries every 100 ms
        assert sum(w.stats.disconnects.values()) == 0
    finally:
        wt.finish()
        good.close()
        for rctx, sock, auth in raw.values():
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            rctx.term()


def test_a_pinned_publisher_that_restarts_on_a_shared_socket_is_reconnected_with_its_own_key(
    keys: Keys, ctx: zmq.Context
) -> None:
    """Two publishers on one connecting socket (no group grants), each pinned to its own key. The socket
    kept the last endpoint's key, so reconnecting the first after its restart pinned the second's: it was
    cut off for good (and reported as an impostor)."""
    import socket as pysocket

    def free_endpoint() -> str:
        with pysocket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{probe.getsockname()[1]}"

    eps = {"cam": free_endpoint(), "other": free_endpoint()}

    def publisher(name: str) -> SensorPublisher:
        sensor = {"cam": "rad_vis", "other": "rad_ir"}[name]
        return SensorPublisher(eps[name], "g1", {sensor: "rad"}, socket_type="push", curve_secret=keys.secret(name),
                               curve_clients=keys.daemon_dir, send_timeout_ms=100)  # fmt: skip

    pubs = {name: publisher(name) for name in eps}
    curve = security.CurveConfig(keys.secret("daemon"), server_keys={ep: keys.public(n) for n, ep in eps.items()})
    groups = {"g1": GroupSettings("g1", {"rad_vis": "seq_a", "rad_ir": "seq_b"}, _spec("replay"))}
    wt = WorkerThread(IngestSettings(tuple(eps.values()), groups, bind=False, transport="pull", curve=curve), ctx)
    wt.start()
    w = wt.worker
    received = lambda: w.messages()["g1", "rad_vis", "rad"]  # noqa: E731
    seq = iter(range(10**6))

    def send() -> None:
        with contextlib.suppress(TimeoutError):  # no connected peer yet: nothing sent
            pubs["cam"].send_samples("rad_vis", SAMPLES, T0 + next(seq) * SEC // 10, 1_000_000)

    try:
        _probe(send, lambda: received() > 0)
        pubs["cam"].close()  # the publisher restarts on the same port
        time.sleep(0.3)
        pubs["cam"] = publisher("cam")
        before = received()
        _probe(send, lambda: received() > before)
        assert w.auth_rejected().get("handshake", 0) == 0
    finally:
        wt.finish()
        for p in pubs.values():
            p.close()


# ----------------------------------------------------------------------------------------------------
# Results: only authorised readers can subscribe
# ----------------------------------------------------------------------------------------------------


def test_results_reach_only_readers_with_an_admitted_key(keys: Keys) -> None:
    curve = security.CurveConfig(keys.secret("daemon"), authorized_dir=keys.readers)
    sink = ZmqResultPublisher("tcp://127.0.0.1:*", secure=security.socket_securer(curve, "results"))
    ctx = zmq.Context()
    subs = {
        "reader": _client(ctx, zmq.SUB, sink.endpoint, keys, "reader"),
        "stranger": _client(ctx, zmq.SUB, sink.endpoint, keys, "stranger"),
        "plain": _client(ctx, zmq.SUB, sink.endpoint, None, None),
    }
    got: dict[str, list] = {name: [] for name in subs}
    try:
        for sub in subs.values():
            sub.setsockopt(zmq.SUBSCRIBE, b"det/")
        written = {}
        deadline = time.monotonic() + 15
        i = 0
        while len(got["reader"]) < 10 and time.monotonic() < deadline:
            record = make_result(i)
            written[record.start_ns] = record
            sink.write(record)
            i += 1
            time.sleep(0.01)
            for name, sub in subs.items():
                while sub.poll(0):
                    got[name].append(sub.recv_multipart())
        time.sleep(0.5)  # give the refused ones every chance to receive something
        for name, sub in subs.items():
            while sub.poll(0):
                got[name].append(sub.recv_multipart())
        assert len(got["reader"]) >= 10
        for topic, body in got["reader"]:
            wire = msgpack.unpackb(body)
            assert topic == b"det/g1" and wire["model_version"] == written[wire["start_ns"]].model_version
        assert got["stranger"] == [] and got["plain"] == []
        assert sink.auth is not None
        wait_for(lambda: sink.auth.rejected["unknown_key"] >= 1 and _null_refusals(sink.auth) >= 1, what="refusals")
    finally:
        sink.close()
        ctx.destroy(linger=0)


# ----------------------------------------------------------------------------------------------------
# Admin HTTP beyond loopback
# ----------------------------------------------------------------------------------------------------


def _admin(host: str, **kw) -> AdminServer:
    handlers = AdminHandlers(
        metrics=lambda accept: (b"# nothing\n", "text/plain"),
        health=lambda: (True, {}),
        ready=lambda: (True, {}),
        reload=lambda: (200, {"result": "success"}),
    )
    return AdminServer(host, 0, handlers, **kw).start()


def test_admin_beyond_loopback_needs_the_token_everywhere_but_healthz() -> None:
    server = _admin("0.0.0.0", token="s3cret")
    base = f"http://127.0.0.1:{server.address[1]}"
    try:
        assert not server.loopback
        assert _get(f"{base}/healthz") == 200
        for path in ("/metrics", "/readyz"):
            assert _get(f"{base}{path}") == 403 and _get(f"{base}{path}", "wrong") == 403
            assert _get(f"{base}{path}", "s3cret") == 200
        assert _get(f"{base}/reload", method="POST") == 403 and _get(f"{base}/reload", "s3cret", "POST") == 200
    finally:
        server.stop()

    server = _admin("0.0.0.0")  # no token configured: only the public endpoint answers
    base = f"http://127.0.0.1:{server.address[1]}"
    try:
        assert _get(f"{base}/healthz") == 200
        assert [_get(f"{base}{p}", "anything") for p in ("/metrics", "/readyz")] == [403, 403]
    finally:
        server.stop()

    server = _admin("0.0.0.0", token="s3cret", public_endpoints=("/healthz", "/metrics", "/reload"))
    base = f"http://127.0.0.1:{server.address[1]}"
    try:  # an operator may open /metrics to a scraper; /reload can never be made public
        assert _get(f"{base}/metrics") == 200 and _get(f"{base}/readyz") == 403
        assert _get(f"{base}/reload", method="POST") == 403
    finally:
        server.stop()

    server = _admin("127.0.0.1", token="s3cret")
    base = f"http://127.0.0.1:{server.address[1]}"
    try:  # with a token, loopback is no exception (a proxy on the host forwards from 127.0.0.1)
        assert _get(f"{base}/metrics") == 403 and _get(f"{base}/readyz") == 403 and _get(f"{base}/healthz") == 200
        assert _get(f"{base}/metrics", "s3cret") == 200 and _get(f"{base}/reload", method="POST") == 403
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


def _raw(**sections: dict) -> dict:
    raw = tomllib.loads((ROOT / "config.toml").read_text())
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def test_security_config_errors_name_the_key(keys: Keys) -> None:
    sec = {"curve": True, "secret_key": str(keys.secret("daemon")), "authorized_readers": str(keys.readers)}
    pin = {"sensor_server_keys": {"tcp://127.0.0.1:5555": str(keys.public("cam"))}}
    cases = [
        ({"security": {"curve": True}}, "security.secret_key: required"),
        ({"security": {"sensor_groups": {"cam": ["g1"]}}}, "security.sensor_groups: needs curve = true"),
        ({"security": sec}, "security.sensor_server_keys: no publisher key for endpoint tcp://127.0.0.1:5555"),
        ({"security": {**sec, "sensor_server_keys": {"tcp://x:1": "k.key"}}}, "sensor_server_keys.tcp://x:1: not one"),
        ({"security": sec, "ingest": {"bind": True}}, "security.authorized_sensors: required"),
        ({"security": {**sec, **pin, "sensor_groups": {"cam": ["g9"]}}}, "sensor_groups.cam: group 'g9' is not"),
        ({"security": {**sec, **pin, "authorized_readers": ""}}, "security.authorized_readers: required"),
        ({"security": {**sec, **pin, "allow_ips": ["10.0.0.300"]}}, "security.allow_ips: '10.0.0.300'"),
        # keys the topology never reads (a server key for a bound socket, say) must not look active
        (
            {"security": {**sec, **pin, "results_server_key": str(keys.public("cam"))}},
            "security.results_server_key: only read with [sinks] zmq_bind = false",
        ),
        (
            {"security": {**sec, **pin, "authorized_sensors": str(keys.readers)}},
            "security.authorized_sensors: only read with [ingest] bind = true",
        ),
        (
            {"security": {**sec, **pin, "authorized_sensors": str(keys.readers)}, "ingest": {"bind": True}},
            "security.sensor_server_keys: only read with [ingest] bind = false",
        ),
        ({"model": {"sha256": "abc"}}, "model.sha256: must be 64 hex digits"),
        ({"admin": {"public_endpoints": ["/reload"]}}, "admin.public_endpoints: '/reload' cannot be public"),
    ]
    for sections, expected in cases:
        with pytest.raises(config_mod.ConfigError, match=re.escape(expected)):
            config_mod.parse(_raw(**sections))

    os.chmod(keys.secret("daemon"), 0o644)
    with pytest.raises(config_mod.ConfigError, match=r"security\.secret_key: .*mode 0644"):
        config_mod.parse(_raw(security={**sec, **pin}))
    os.chmod(keys.secret("daemon"), 0o600)

    cfg = config_mod.parse(_raw(security={**sec, **pin, "sensor_groups": {"cam": ["g1"]}, "deny_ips": ["10.0.0.0/8"]}))
    ing, res = cfg.ingest.curve, cfg.sinks.zmq_curve
    assert ing is not None and res is not None
    assert ing.server_keys == {"tcp://127.0.0.1:5555": keys.public("cam")} and ing.groups == {"cam": ("g1",)}
    assert ing.authorized_dir is None and ing.deny_ips == ("10.0.0.0/8",)
    assert res.authorized_dir == keys.readers and res.secret_file == keys.secret("daemon")
    assert config_mod.parse(_raw()).ingest.curve is None


# ----------------------------------------------------------------------------------------------------
# Pinned checkpoints
# ----------------------------------------------------------------------------------------------------


def test_a_checkpoint_that_differs_from_the_pinned_sha256_is_refused_at_start(tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"not the pinned bytes")
    pinned = "0" * 64
    cfg = config_mod.parse(_raw(model={"checkpoint": str(ckpt), "sha256": pinned}))
    assert service.serve(cfg) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt} has sha256 {service.checkpoint_sha256(ckpt)}" in err and pinned in err


def test_secured_daemon_end_to_end_with_a_pinned_checkpoint(tmp_path: Path, keys: Keys) -> None:
    """`sacmf serve` with CURVE on input and results: the authenticator runs in the ingest process,
    refusals of both sockets reach /metrics, and a reload of a file off the pin keeps the old model."""
    from tests.service_helpers import http, sacmf, tiny_checkpoint

    ckpt = tmp_path / "served.pt"
    sha = tiny_checkpoint(ckpt, "pinned")
    ingest_ep = f"ipc:///tmp/sacmf-sec-in-{os.getpid()}.ipc"
    results_ep = f"ipc:///tmp/sacmf-sec-out-{os.getpid()}.ipc"
    config = tmp_path / "serve.toml"
    config.write_text(f"""
[ingest]
endpoints = ["{ingest_ep}"]
bind = true
[window]
size_ms = 500
allowed_lateness_ms = 100
[groups.g1]
sensors = {{ cam_vis = "image_a", cam_ir = "image_b", rad_vis = "seq_a", rad_ir = "seq_b" }}
[logging]
format = "json"
[model]
checkpoint = "{ckpt}"
sha256 = "{sha}"
torch_threads = 1
[inference]
max_batch_size = 2
[sinks]
zmq_endpoint = "{results_ep}"
[admin]
listen = "127.0.0.1:0"
token = "s3cret"
[security]
curve = true
secret_key = "{keys.secret("daemon")}"
authorized_sensors = "{keys.sensors}"
authorized_readers = "{keys.readers}"
sensor_groups = {{ cam = ["g1"] }}
[rate_limit]
sensors = {{ "g1/rad_vis" = {{ messages_per_s = 1000 }} }}
""")
    from daemon import simulate

    ctx = zmq.Context()
    sensors = {"cam_vis": "img", "cam_ir": "img", "rad_vis": "rad", "rad_ir": "rad"}
    pub = SensorPublisher(
        ingest_ep,
        "g1",
        sensors,
        bind=False,
        context=ctx,
        curve_secret=keys.secret("cam"),
        curve_server_public=keys.public("daemon"),
    )
    stop = threading.Event()
    sim = simulate.SimSettings(frame_rate_hz=10, sample_rate_hz=500, chunk_samples=50, height=32, width=32)
    sim_thread = threading.Thread(target=simulate.run, args=(pub, sim, stop), daemon=True)
    reader = _client(ctx, zmq.SUB, results_ep, keys, "reader")
    snoop = _client(ctx, zmq.SUB, results_ep, None, None)
    intruder = _client(ctx, zmq.PUB, ingest_ep, None, None)
    for sub in (reader, snoop):
        sub.setsockopt(zmq.SUBSCRIBE, b"det/")
    proc = sacmf("serve", str(config))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    sim_thread.start()
    try:
        deadline = time.monotonic() + 90
        while not reader.poll(100):
            intruder.send_multipart(_rad("g1", "rad_ir", 0))
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-10:])
        assert msgpack.unpackb(reader.recv_multipart()[1])["model_version"] == "pinned"
        port = next(json.loads(line)["port"] for line in lines if "admin_listening" in line)
        admin, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer s3cret"}

        assert http(f"{admin}/metrics")[0] == 403  # a token is set: required on loopback too

        def sample(name: str, **labels: str) -> float | None:
            for line in http(f"{admin}/metrics", headers=auth)[1].splitlines():
                if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                    return float(line.rsplit(" ", 1)[1])
            return None

        def refused(sock: str) -> float:  # a peer without CURVE: "mechanism" or "handshake" (a libzmq race)
            reasons = ("mechanism", "handshake")
            return sum(sample("sacmf_auth_rejected_total", socket=sock, reason=r) or 0 for r in reasons)

        wait_for(lambda: refused("ingest") >= 1, what="the ingest process's refusal in /metrics")
        wait_for(lambda: refused("results") >= 1, what="the results socket's refusal in /metrics")
        assert sample("sacmf_auth_rejected_total", socket="ingest", reason="unknown_key") == 0
        assert sample("sacmf_ingest_rate_limited_messages_total", group="g1", sensor="rad_vis") == 0
        assert sample("sacmf_ingest_rejected_messages_total", reason="unauthorised_group") == 0
        assert not snoop.poll(0)

        tiny_checkpoint(ckpt, "off-pin", seed=1)  # a valid checkpoint, but not the pinned bytes
        status, body = http(f"{admin}/reload", "POST", auth)
        assert status == 422 and "differs from [model] sha256" in body
        assert sample("sacmf_model_reloads_total", result="failure") == 1
        assert sample("sacmf_model_info", sha256=sha) == 1
        wait_for(lambda: reader.poll(0) and msgpack.unpackb(reader.recv_multipart()[1])["model_version"] == "pinned")
    finally:
        stop.set()
        sim_thread.join(5)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        pub.close()
        ctx.destroy(linger=0)
        for ep in (ingest_ep, results_ep):
            Path(ep.removeprefix("ipc://")).unlink(missing_ok=True)
    assert code == 0, "".join(lines[-10:])
