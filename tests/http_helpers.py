"""HTTP status of an admin request, for tests that must not import torch (tests/service_helpers.py does)."""

from __future__ import annotations

import urllib.error
import urllib.request


def status(url: str, token: str | None = None, method: str = "GET") -> int:
    """The HTTP status of ``method url``, with ``Authorization: Bearer token`` when a token is given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
