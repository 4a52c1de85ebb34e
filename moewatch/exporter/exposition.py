"""Fast scrapes for big models: the families that change once per window are rendered once per window.

prometheus-client formats every sample on every scrape; for 60 layers x 256 experts that is ~32k samples,
3 MB and about 0.3 s of interpreter time (holding the GIL the training loop needs) per scrape. The
HTTP app here lets prometheus-client render only the collector's small, live families (counters of
scrapes, hook errors, notifications, plus anything else on the registry) and appends the window's
families from a per-window cache, in the same text format (and as an extra gzip member when the scraper
asked for gzip: a multi-member gzip stream is one valid body).
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.utils import floatToGoString

__all__ = ["SPLIT", "escape_label", "render_family_text", "split_app"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]


class _Split(threading.local):
    active: bool = False


#: Set on the scrape thread while prometheus-client renders the live part only.
SPLIT = _Split()

_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def render_family_text(
    name: str, kind: str, doc: str, samples: Iterable[tuple[str, float]], suffix: str = ""
) -> str:
    """One family in Prometheus text format 0.0.4, byte-identical to prometheus-client's output.
    ``samples`` are ``(rendered_labels, value)`` with labels already as ``k="v",...``."""
    full = name + suffix
    out = [f"# HELP {full} {_escape_help(doc)}\n# TYPE {full} {kind}\n"]
    out.extend(f"{full}{{{labels}}} {floatToGoString(value)}\n" for labels, value in samples)
    return "".join(out)


def split_app(base_app: Callable[..., Iterable[bytes]], static: Callable[[bool], bytes]) -> Callable[..., Any]:
    """Wrap prometheus-client's WSGI app: live part from ``base_app``, then ``static(gzipped)``."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if "name[]" in parse_qs(environ.get("QUERY_STRING", "")):
            # filtered scrapes (name[]=..., usually sent URL-encoded as name%5B%5D): prometheus-client's
            # own filtered render
            return base_app(environ, start_response)
        captured: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            captured[:] = [status, headers]

        environ = dict(environ, HTTP_ACCEPT=_TEXT)  # the cache is in text format 0.0.4
        SPLIT.active = True
        try:
            body = b"".join(base_app(environ, capture))
        finally:
            SPLIT.active = False
        status, headers = captured
        if status.startswith("200") and environ.get("REQUEST_METHOD", "GET") != "HEAD":
            gzipped = any(k.lower() == "content-encoding" and v == "gzip" for k, v in headers)
            body += static(gzipped)
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        return [body]

    return app


def gzip_member(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1)
