"""Write the generated monitoring files: ``python -m moewatch.exporter.generate [--root DIR] [--check]``.

Files: ``alerts/moewatch-rules.yaml``, ``alerts/moewatch-rules.test.yaml`` and the Grafana dashboards in
``dashboards/``. ``--check`` exits 1 when a committed file differs from what the code generates. The
committed dashboards draw their bands at the default thresholds; ``--thresholds-from-env`` draws them at
the ``MOEWATCH_THRESHOLDS__*`` values of the environment instead (write them to your own ``--root``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from moewatch.config import Thresholds, build_config
from moewatch.exporter.dashboards import dashboard_files
from moewatch.exporter.rules import RuleOptions, rules_test_yaml, rules_yaml

__all__ = ["generated_files", "main"]

log = logging.getLogger(__name__)


def generated_files(opts: RuleOptions | None = None, thresholds: Thresholds | None = None) -> dict[str, str]:
    """Relative path -> content of every generated file."""
    opts = opts or RuleOptions()
    files = {
        "alerts/moewatch-rules.yaml": rules_yaml(opts),
        "alerts/moewatch-rules.test.yaml": rules_test_yaml(opts),
    }
    files.update({f"dashboards/{name}": text for name, text in dashboard_files(thresholds).items()})
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root (default: .)")
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    parser.add_argument(
        "--thresholds-from-env", action="store_true", help="dashboard bands at the MOEWATCH_THRESHOLDS__* values"
    )
    args = parser.parse_args(argv)
    thresholds = build_config(None, {}).thresholds if args.thresholds_from_env else None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stale = []
    for rel, text in generated_files(thresholds=thresholds).items():
        path = args.root / rel
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        stale.append(rel)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            log.info("wrote %s", path)
    if args.check and stale:
        log.error("out of date (run python -m moewatch.exporter.generate): %s", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
