"""transformers' own common model tests, fetched at run time (never vendored into this repo).

The sdist of the *installed* transformers version ships ``tests/test_*common*.py`` (not ``tests/models/``).
:func:`hf_tests_dir` downloads it once into a cache dir (``sys.executable -m pip download``), extracts the
top-level ``tests/*.py`` and returns that folder; :func:`load_common` imports ``test_modeling_common`` from it
as the package :data:`PACKAGE`, with empty stand-ins for the two mixins the sdist does not ship.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

PACKAGE = "hf_peer_tests"
REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / ".cache" / "transformers-sdist"
DOWNLOAD_TIMEOUT_S = 300
# Set by the driver (tests/test_peer_suite.py) for its subprocesses; a standalone run downloads itself.
ENV_TESTS_DIR = "PEER_HF_TESTS_DIR"


class SdistUnavailable(RuntimeError):
    """The transformers sdist could not be downloaded or read; the message says why and how to fix it."""


def installed_version() -> str:
    import transformers

    return transformers.__version__


def hf_tests_dir(cache: Path = DEFAULT_CACHE) -> Path:
    """``<cache>/transformers-<version>/tests``, downloading and extracting the sdist if it is not there."""
    version = installed_version()
    dest = cache / f"transformers-{version}" / "tests"
    if (dest / "test_modeling_common.py").is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"transformers-{version}.tar.gz"
    fix = (
        f"fix: make the package index reachable, or put the sdist at {archive} "
        f"(`{sys.executable} -m pip download --no-deps --no-binary :all: transformers=={version} -d {cache}`)"
    )
    if not archive.is_file():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            f"transformers=={version}",
            "-d",
            str(cache),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SdistUnavailable(
                f"`pip download` of transformers=={version} took over {DOWNLOAD_TIMEOUT_S}s; {fix}"
            ) from None
        if proc.returncode != 0 or not archive.is_file():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise SdistUnavailable(
                f"`pip download` of the transformers=={version} sdist failed (rc {proc.returncode}): "
                + " | ".join(tail)
                + f"; {fix}"
            )
    prefix = f"transformers-{version}/tests/"
    tmp = Path(tempfile.mkdtemp(prefix="extract-", dir=cache))
    try:
        with tarfile.open(archive) as tar:
            # Only the top-level tests/*.py: the common mixins and their helpers.
            members = [
                m
                for m in tar.getmembers()
                if m.isfile()
                and m.name.startswith(prefix)
                and "/" not in m.name[len(prefix) :]
                and m.name.endswith(".py")
            ]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(tmp, members=members, filter="data")
        if not (tmp / "test_modeling_common.py").is_file():
            raise SdistUnavailable(f"{archive} has no {prefix}test_modeling_common.py; {fix}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, dest)  # atomic: two concurrent runs never see a half-extracted folder
        except OSError:
            if not (dest / "test_modeling_common.py").is_file():
                raise
    except (tarfile.TarError, OSError) as exc:
        raise SdistUnavailable(f"could not extract {archive} ({type(exc).__name__}: {exc}); {fix}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _stub(name: str, **attrs: object) -> None:
    if name in sys.modules:
        return
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package with nothing on disk: only what is registered here imports
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


class ExportTesterMixin:
    """Stand-in for tests/exporters/test_export.py (not in the sdist): no export tests run."""


class GenerationTesterMixin:
    """Stand-in for tests/generation/test_utils.py (not in the sdist): no generate() tests run."""


def load_common(tests_dir: Path | None = None) -> types.ModuleType:
    """Import ``test_modeling_common`` from the extracted sdist as ``hf_peer_tests.test_modeling_common``."""
    name = f"{PACKAGE}.test_modeling_common"
    if name in sys.modules:
        return sys.modules[name]
    if tests_dir is None:
        env = os.environ.get(ENV_TESTS_DIR)
        tests_dir = Path(env) if env else hf_tests_dir()
    pkg = types.ModuleType(PACKAGE)
    pkg.__path__ = [str(tests_dir)]
    sys.modules[PACKAGE] = pkg
    _stub(f"{PACKAGE}.exporters")
    _stub(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=ExportTesterMixin)
    _stub(f"{PACKAGE}.generation")
    _stub(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
    return importlib.import_module(name)
