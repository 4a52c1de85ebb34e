"""Exporter-toolkit style web config: TLS and bcrypt basic auth, on a real TLS socket."""

from __future__ import annotations

import logging
from pathlib import Path

import bcrypt
import pytest
import requests
from test_exporter_guard import cert  # noqa: F401 - the module-scoped certificate fixture

from moewatch.config import ConfigError
from moewatch.exporter import PrometheusConfig, PrometheusExporter


def _web_config(tmp_path: Path, cert_key: tuple[Path, Path], users: dict[str, str]) -> Path:
    c, k = cert_key
    lines = ["tls_server_config:", f"  cert_file: {c}", f"  key_file: {k}", "basic_auth_users:"]
    lines += [f"  {u}: '{h}'" for u, h in users.items()]
    path = tmp_path / "web.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_basic_auth_with_bcrypt_over_tls(
    tmp_path: Path, cert: tuple[Path, Path], caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    hashed = bcrypt.hashpw(b"s3cret-pw", bcrypt.gensalt(rounds=4)).decode()
    web = _web_config(tmp_path, cert, {"prom": hashed})
    with caplog.at_level(logging.INFO, logger="moewatch"):
        ex = PrometheusExporter("auth", PrometheusConfig(host="127.0.0.1", port=0, web_config_file=web))
    try:
        assert ex.url.startswith("https://")
        verify = str(cert[0])
        assert requests.get(ex.url, verify=verify, timeout=5).status_code == 401
        r = requests.get(ex.url, verify=verify, timeout=5, auth=("prom", "wrong"))
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        assert requests.get(ex.url, verify=verify, timeout=5, auth=("nobody", "s3cret-pw")).status_code == 401
        for _ in range(2):  # the second one from the cache
            r = requests.get(ex.url, verify=verify, timeout=5, auth=("prom", "s3cret-pw"))
            assert r.status_code == 200 and "moewatch_windows_total" in r.text
        root = ex.url.rsplit("/", 1)[0] + "/"
        assert requests.get(root, verify=verify, timeout=5).status_code == 401  # every path is protected
    finally:
        ex.close()
    assert "basic auth" in caplog.text and "bound to 127.0.0.1:" in caplog.text
    assert hashed not in caplog.text


def test_bad_web_config_is_a_config_error_without_the_hash(tmp_path: Path, cert: tuple[Path, Path]) -> None:  # noqa: F811
    web = _web_config(tmp_path, cert, {"prom": "plaintextSECRET"})
    with pytest.raises(ConfigError, match="basic_auth_users.prom is not a bcrypt hash") as info:
        PrometheusExporter("bad", PrometheusConfig(host="127.0.0.1", port=0, web_config_file=web))
    assert "plaintextSECRET" not in str(info.value)
    (tmp_path / "typo.yml").write_text("basic_auth_user:\n  prom: x\n")
    with pytest.raises(ConfigError, match="basic_auth_user"):
        PrometheusExporter("bad", PrometheusConfig(host="127.0.0.1", port=0, web_config_file=tmp_path / "typo.yml"))


def test_default_bind_is_documented_as_all_interfaces() -> None:
    field = PrometheusConfig.model_fields["host"]
    assert field.default == "0.0.0.0" and "all interfaces" in (field.description or "")


def test_bind_address_is_the_real_one() -> None:
    ex = PrometheusExporter("bind", PrometheusConfig(host="127.0.0.1", port=0))
    try:
        assert ex.bind_address == f"127.0.0.1:{ex.port}"
    finally:
        ex.close()
    assert ex.bind_address is None
