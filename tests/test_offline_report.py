"""``moewatch report``: the offline HTML rendered in real headless Chromium, PNG export, terminal summary.

Input is real: the demo's ``--balance none`` collapse written to its JSONL log. Chromium runs with a proxy
pointing at a loopback HTTP server that records every request it receives, so a page that fetched
anything over the network would show up there (a control page proves the recorder sees requests).
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from moewatch.cli import main
from moewatch.offline_report import load_run, render_html
from tests.ci import missing, require_module

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium's own service traffic (network time, component updater, sign-in), which the flags below do not
# fully silence; anything else reaching the proxy came from the page. Exact hosts: fonts.googleapis.com or
# any CDN is still caught.
_BROWSER_OWN = re.compile(
    r"^(GET http://clients2\.google\.com/time/|POST http://update\.googleapis\.com/service/update2/"
    r"|CONNECT (accounts\.google\.com|update\.googleapis\.com|clients2\.google\.com):443$)"
)


def _page_requests(seen: list[str]) -> list[str]:
    return [s for s in seen if not _BROWSER_OWN.match(s)]


def _need_chromium() -> str:
    if CHROMIUM is None:
        missing("chromium is not installed (apt-get install chromium; .ci/run does)")
    return CHROMIUM


@pytest.fixture(scope="module")
def demo_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moewatch.demo.run import DemoOptions, run_demo

    root = tmp_path_factory.mktemp("demo")
    out, cfg = root / "windows.jsonl", root / "moewatch.yaml"
    cfg.write_text("prometheus: {enabled: false}\nalerts: {enabled: false}\n", encoding="utf-8")
    run_demo(
        DemoOptions(balance="none", steps=200, window=10, jsonl=out, console=False, seed=0, config_file=cfg)
    )
    return out


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def _record(self) -> None:
        type(self).seen.append(f"{self.command} {self.path}")
        self.send_response(204)
        self.end_headers()

    do_GET = do_POST = do_CONNECT = do_HEAD = _record  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def proxy() -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []
    handler = type("Rec", (_Recorder,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def _chromium(page: Path, proxy_addr: str, profile: Path, *extra: str) -> tuple[str, list[str]]:
    """Run headless Chromium on ``page``; return its stdout and the page's console messages (Chromium's own
    log of every console call and uncaught exception, independent of the page's error recorder)."""
    cmd = [
        _need_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--disable-default-apps", f"--user-data-dir={profile}",
        f"--proxy-server=http://{proxy_addr}", "--proxy-bypass-list=<-loopback>",
        "--virtual-time-budget=5000", "--window-size=1560,1300", "--hide-scrollbars",
        "--enable-logging=stderr", "--v=0", *extra, page.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def _png_is_not_blank(path: Path, min_colors: int = 8) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    img_HWC = mpimg.imread(path)
    assert img_HWC.ndim == 3 and img_HWC.shape[0] > 200 and img_HWC.shape[1] > 400
    colors = np.unique((img_HWC[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) >= min_colors, f"{path} has only {len(colors)} colours"
    assert float(img_HWC[..., :3].std()) > 0.05, f"{path} is nearly uniform"


def test_html_renders_in_headless_chromium_offline_with_every_figure(
    demo_log: Path, tmp_path: Path, proxy: tuple[str, list[str]]
) -> None:
    addr, seen = proxy
    page = tmp_path / "report.html"
    assert main(["report", str(demo_log), "-o", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), "external reference in the page"
    n_layers = len(load_run(demo_log).layers)
    figures = text.count('class="fig"')
    assert figures == n_layers * 6  # timeline, heatmap, four metrics per layer

    dom, console = _chromium(page, addr, tmp_path / "profile", "--dump-dom")
    assert console == [], console
    assert f'data-moewatch-rendered="{figures}"' in dom, dom[:500]
    assert not re.search(r"<html[^>]*data-moewatch-errors", dom), dom[:2000]
    for fig in ("heatmap", "timeline", 'metric" data-metric="load_cov', 'metric" data-metric="norm_entropy'):
        assert dom.count(f'data-fig="{fig}"') == n_layers
    assert 'id="summary"' in dom and "collapsed" in dom
    shot = tmp_path / "shot.png"
    assert _chromium(page, addr, tmp_path / "profile2", f"--screenshot={shot}")[1] == []
    _png_is_not_blank(shot)
    assert _page_requests(seen) == [], f"the report made network requests: {seen}"


def test_the_checks_catch_errors_and_network_requests(tmp_path: Path, proxy: tuple[str, list[str]]) -> None:
    """Controls: a report page with a script error and an external image records both; a page without the
    CSP that loads an http image reaches the recording proxy."""
    addr, seen = proxy
    run = load_run_demo_free(tmp_path)
    bad = render_html(run).replace(
        "</body>", '<img src="http://example.invalid/x.png"><script>undefinedFunction();</script></body>'
    )
    page = tmp_path / "bad.html"
    page.write_text(bad, encoding="utf-8")
    dom, console = _chromium(page, addr, tmp_path / "p1", "--dump-dom")
    assert any("undefinedFunction is not defined" in line for line in console), console
    errors = json.loads(re.search(r"data-moewatch-errors=\"([^\"]*)\"", dom).group(1).replace("&quot;", '"'))
    assert any("undefinedFunction" in e for e in errors) and any("example.invalid" in e for e in errors)
    assert _page_requests(seen) == []  # the CSP blocked the image before any request

    leaky = tmp_path / "leaky.html"
    leaky.write_text('<html><body><img src="http://example.invalid/x.png"></body></html>', encoding="utf-8")
    _chromium(leaky, addr, tmp_path / "p2", "--dump-dom")
    assert any("example.invalid" in s for s in _page_requests(seen)), seen


def load_run_demo_free(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A small two-window log written by hand (no demo run) for the control test."""
    layer = {
        "index": 0, "module": "m.gate", "family": "transformers", "num_experts": 4, "top_k": 1, "tokens": 100,
        "assignments": 100, "loads": [25, 25, 25, 25], "fair_share": 25.0, "load_cov": 0.0, "dead_ratio": 0.0,
        "top2_excess": 0.0, "norm_entropy": 1.0, "state": "healthy",
    }
    lines = [
        {"run": "r", "window": 0, "step_start": 0, "step_end": 10, "layers": [layer], "state": "healthy"},
        {
            "run": "r", "window": 1, "step_start": 10, "step_end": 20, "state": "warning",
            "layers": [{**layer, "state": "warning", "load_cov": 0.5, "projected_collapse_step": 90,
                        "noise_floor": {"load_cov": 0.2}}],
        },
    ]
    path = tmp_path / "hand.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return load_run(path)


def test_optional_fields_are_rendered_when_present(tmp_path: Path) -> None:
    run = load_run_demo_free(tmp_path)
    assert run.layers[0].projected == [None, 90]
    assert run.layers[0].noise["load_cov"] == [None, 0.2]
    text = render_html(run)
    assert 'class="noise"' in text and 'class="early"' in text and "projected collapse at step 90" in text
    assert "healthy &rarr; <b>warning</b>" in text


def test_png_export_writes_one_non_blank_image_per_layer(demo_log: Path, tmp_path: Path) -> None:
    require_module("matplotlib", 'pip install -e ".[report]"')
    assert main(["report", str(demo_log), "--png", str(tmp_path / "png"), "-o", str(tmp_path / "r.html")]) == 0
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == ["layer-000.png", "layer-001.png"]
    for p in pngs:
        _png_is_not_blank(p, min_colors=20)


def test_text_summary_and_run_directory_input(
    demo_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(demo_log, run_dir / "windows.jsonl")
    assert main(["report", "--text", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "20 windows, steps 0-200" in out and "final state collapsed" in out
    assert re.search(r"^0\s+collapsed\s+\S+", out, re.M)
    assert not (run_dir / "report.html").exists()  # --text alone writes no HTML
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").is_file()


def test_bad_inputs_get_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no windows.jsonl" in capsys.readouterr().err
    (tmp_path / "x.jsonl").write_text("not json\n")
    assert main(["report", str(tmp_path / "x.jsonl")]) == 2
    assert "x.jsonl:1 is not JSON" in capsys.readouterr().err


def test_png_without_matplotlib_says_how_to_install_it(
    demo_log: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["report", str(demo_log), "--png", str(tmp_path / "png")]) == 2
    assert "pip install 'moewatch[report]'" in capsys.readouterr().err
