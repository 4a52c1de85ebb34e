"""Fast scrapes for big models: the families that change once per window are rendered once per window.

prometheus-client formats every sample on every scrape; for 60 layers x 256 experts that is ~32k samples,
3 MB and about 0.3 s of interpreter time (holding the GIL the training loop needs) per scrape. The
HTTP app here lets prometheus-client render the registry without the collector's per-window families
(:class:`FastPath` names them; what is left is small: counters of scrapes, hook errors, notifications, and
anything else on the registry) and appends those families from a per-window cache, in the same text
format (and as an extra gzip member when the scraper asked for gzip: a multi-member gzip stream is one
valid body). :func:`expert_text` writes the per-expert families ~20x faster than prometheus-client.

``floatToGoString`` is prometheus-client's private number formatter: using it keeps the bytes identical
to the library's render, which ``tests/test_exporter_fast_scrape.py`` pins (a change in the library fails
that test rather than passing unnoticed).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from moewatch.exporter.families import EXPERT_ASSIGNED_HELP, EXPERT_DEAD_HELP, EXPERT_IDLE_HELP
from moewatch.exporter.snapshot import Snapshot

__all__ = ["FastPath", "escape_label", "expert_text", "gzip_member", "render_family_text", "split_app"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]


@dataclass(frozen=True)
class FastPath:
    """What the fast scrape needs from a collector: the names of its per-window families (left out of
    prometheus-client's render) and ``text(gzipped)``, those families rendered once per window."""

    names: frozenset[str]
    text: Callable[[bool], bytes]


class _Without(Collector):
    """A registry's families without the per-window ones (public ``collect()`` only)."""

    def __init__(self, registry: Collector, names: frozenset[str]) -> None:
        self._registry = registry
        self._names = names

    def collect(self) -> Iterator[Metric]:
        return (m for m in self._registry.collect() if m.name not in self._names)

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


def expert_text(snap: Snapshot, run: str, labels: dict[str, str]) -> str:
    """The ``moewatch_expert_*`` families of ``snap`` with the constant ``labels``, byte-identical to
    prometheus-client's render of :func:`moewatch.exporter.families.expert_families`."""
    const = {"run": run, **labels}
    assigned: list[tuple[str, float]] = []
    dead: list[tuple[str, float]] = []
    idle: list[tuple[str, float]] = []
    for layer, totals, dead_ids in zip(snap.report.layers, snap.expert_totals, snap.expert_dead, strict=True):
        # prometheus-client writes labels sorted by name: expert first, then layer, module, run (and the
        # constant labels) in order.
        names = {"layer": str(layer.index), "module": layer.module, **const}
        rest = '"' + "".join(f',{k}="{escape_label(v)}"' for k, v in sorted(names.items()))
        assigned.extend((f'expert="{e}{rest}', n) for e, n in enumerate(totals))
        dead.extend((f'expert="{e}{rest}', 1.0 if e in dead_ids else 0.0) for e in range(len(totals)))
        idle.extend((f'expert="{e}{rest}', float(n)) for e, n in enumerate(layer.idle_windows))
    return (
        render_family_text("moewatch_expert_assignments", "counter", EXPERT_ASSIGNED_HELP, assigned, "_total")
        + render_family_text("moewatch_expert_dead", "gauge", EXPERT_DEAD_HELP, dead)
        + render_family_text("moewatch_expert_idle_windows", "gauge", EXPERT_IDLE_HELP, idle)
    )


def split_app(
    make_app: Callable[[Collector], Callable[..., Iterable[bytes]]], registry: Collector, fast: FastPath
) -> Callable[..., Any]:
    """The /metrics WSGI app: prometheus-client's app (``make_app``) over ``registry`` without the
    per-window families, then ``fast.text(gzipped)``; filtered scrapes get the library's own render."""
    base_app = make_app(registry)
    live_app = make_app(_Without(registry, fast.names))
    static = fast.text

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if "name[]" in parse_qs(environ.get("QUERY_STRING", "")):
            # filtered scrapes (name[]=..., usually sent URL-encoded as name%5B%5D): prometheus-client's
            # own filtered render
            return base_app(environ, start_response)
        captured: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            captured[:] = [status, headers]

        environ = dict(environ, HTTP_ACCEPT=_TEXT)  # the cache is in text format 0.0.4
        body = b"".join(live_app(environ, capture))
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
