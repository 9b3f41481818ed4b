"""`sacmf keygen NAME --dir DIR`: a CURVE key pair in the standard ZeroMQ certificate format.

Why a command of our own around ``zmq.auth.create_certificates``: that function writes the secret
certificate with the process umask (usually world-readable 0644) and overwrites existing files. Here the
pair is written into a private temporary directory first, the secret file is made 0600 before it is
moved into place, and an existing pair is never replaced (replacing a key is a rotation: a new name,
then the old one is removed, see SECURITY.md). ``DIR/NAME.key`` is the public certificate, to be
copied to the peers; ``DIR/NAME.key_secret`` stays on the host that owns the key.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import zmq.auth

from ingest.protocol import NAME_RE
from ingest.security import KeyFileError, load_secret_certificate


def generate(name: str, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Create ``NAME.key`` (0644) and ``NAME.key_secret`` (0600) in ``directory``; returns both paths.

    Raises FileExistsError rather than replace a key, and ValueError for a name that would not be a
    safe file name (the name becomes the key's identity in logs and group allow-lists).
    """
    if not NAME_RE.match(name):
        raise ValueError(f"key name {name!r} must match [A-Za-z0-9_.-]{{1,64}}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists; keys are never overwritten (pick a new name to rotate)")
    staging = Path(tempfile.mkdtemp(prefix=".keygen-", dir=directory))  # mode 0700: private until moved
    try:
        tmp_public, tmp_secret = (Path(p) for p in zmq.auth.create_certificates(staging, name))
        os.chmod(tmp_secret, 0o600)
        os.chmod(tmp_public, 0o644)
        os.link(tmp_secret, secret)  # link, not rename: fails instead of replacing a file created meanwhile
        try:
            os.link(tmp_public, public)
        except BaseException:
            secret.unlink()
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    load_secret_certificate(secret)  # proves the result loads under the daemon's own checks
    return public, secret


def _keygen(args: argparse.Namespace) -> int:
    try:
        public, secret = generate(args.name, args.dir)
    except (FileExistsError, ValueError, KeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"public key (give to peers): {public}")
    print(f"secret key (keep here, mode 0600): {secret}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `keygen`, and the CURVE options of `simulate` (whose parser must exist already)."""
    k = sub.add_parser("keygen", help="create a CURVE key pair (NAME.key, NAME.key_secret) for sensors or the daemon")
    k.add_argument("name", help="key name: the identity in logs and in [security] sensor_groups")
    k.add_argument("--dir", default="keys", help="directory to write into (default: keys)")
    k.set_defaults(func=_keygen)
    _simulate_args(sub.choices["simulate"])


def _simulate_args(parser: argparse.ArgumentParser) -> None:
    """`sacmf simulate --curve-secret FILE (--curve-server-public FILE | --curve-clients DIR)`.

    Without ``--curve-secret`` the command runs as before; with it, ``daemon.simulate.curve_command``
    (imported only then: the simulator pulls in the scene generator) publishes through CURVE.
    """
    g = parser.add_argument_group("CURVE (SECURITY.md)")
    g.add_argument("--curve-secret", default=None, metavar="FILE", help="this sensor's NAME.key_secret (sacmf keygen)")
    g.add_argument("--curve-server-public", default=None, metavar="FILE", help="with --connect: the daemon's .key")
    g.add_argument("--curve-clients", default=None, metavar="DIR", help="binding: directory of admitted keys")
    plain = parser.get_default("func")

    def handler(args: argparse.Namespace) -> int:
        if args.curve_secret is None:
            if args.curve_server_public is not None or args.curve_clients is not None:
                # asked for CURVE without the key to speak it: publishing in plaintext would hide that
                parser.error("--curve-server-public and --curve-clients need --curve-secret (this sensor's key)")
            return plain(args)
        from daemon.simulate import curve_command

        return curve_command(args)

    parser.set_defaults(func=handler)
