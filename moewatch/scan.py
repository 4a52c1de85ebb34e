"""``moewatch scan PATH``: router health of a saved checkpoint, with no training run.

PATH is either a local Hugging Face transformers checkpoint directory (``config.json`` plus weights,
loaded with ``local_files_only=True``: moewatch never contacts the Hub) or a file holding a
``Monitor.state_dict()`` saved with ``torch.save``.

For a checkpoint, moewatch runs ``--batches`` forward passes (eval mode, no gradients; the routers are
counted as in training by setting ``count_eval``) over token ids taken from ``--text`` through the
checkpoint's own tokenizer when it has one, else over uniform random token ids from ``--seed``. All the
batches form one window, whose report is printed as the per-layer health table and written with
``--json`` as one line in the JSONL log's format (``moewatch report`` reads it). The exit status is
1 when any layer is at or above ``--fail-on`` (default ``collapsed``), so a scan can gate a CI job or a
checkpoint promotion; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path
from typing import Any

from moewatch.errors import MoEWatchError
from moewatch.report import HealthState, WindowReport

__all__ = ["ScanError", "register", "scan_checkpoint", "scan_state_dict"]

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Keys a Monitor.state_dict() may use for cumulative per-expert counts ([layers][experts]).
_CUMULATIVE_KEYS = ("cumulative_counts", "cumulative_counts_LE", "expert_counts", "counts_LE", "cumulative")


class ScanError(MoEWatchError, ValueError):
    """A scan input that cannot be read; the message says what to pass instead."""


def _check_path(path: Path) -> None:
    if path.exists():
        return
    text = str(path)
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        raise ScanError(
            f"{text!r} does not exist locally and looks like a Hugging Face Hub id. moewatch scan reads local "
            f"checkpoints only and never downloads: fetch it first (e.g. `hf download {text} --local-dir "
            f"ckpt/`) and pass the directory"
        )
    raise ScanError(
        f"{text}: no such file or directory; pass a transformers checkpoint directory (with config.json) "
        "or a file saved with torch.save(watch.state_dict())"
    )


def _token_batches(
    path: Path, text_file: Path | None, vocab: int, batches: int, batch_size: int, seq_len: int, seed: int
) -> tuple[list[Any], str]:
    import torch

    need = batches * batch_size * seq_len
    ids: list[int] | None = None
    source = f"random tokens (seed {seed})"
    if text_file is not None:
        if not text_file.is_file():
            raise ScanError(f"--text {text_file}: no such file; pass a UTF-8 text file or omit --text")
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("moewatch scan: %s has no usable tokenizer (%s); using random tokens", path, exc)
        else:
            ids = list(tok(text_file.read_text(encoding="utf-8"))["input_ids"])
            if not ids:
                raise ScanError(f"--text {text_file} tokenizes to no tokens; pass a longer text")
            ids = [i for i in ids if 0 <= i < vocab]
            source = f"{text_file.name} through the checkpoint's tokenizer ({len(ids)} tokens, repeated)"
    gen = torch.Generator().manual_seed(seed)
    if ids is None:
        flat_N = torch.randint(0, vocab, (need,), generator=gen)
    else:
        reps = -(-need // len(ids))
        flat_N = torch.tensor(ids * reps, dtype=torch.long)[:need]
    return list(flat_N.view(batches, batch_size, seq_len)), source


def scan_checkpoint(
    path: Path,
    *,
    text_file: Path | None = None,
    batches: int = 8,
    batch_size: int = 4,
    seq_len: int = 128,
    seed: int = 0,
) -> tuple[WindowReport, str]:
    """Load the checkpoint at ``path``, run the sample batches and return (report, input description)."""
    import torch
    import transformers

    from moewatch.adapters.discovery import discover_routers
    from moewatch.config import MoEWatchConfig
    from moewatch.monitor import Monitor

    if not (path / "config.json").is_file():
        raise ScanError(
            f"{path} has no config.json; pass a directory written by save_pretrained() (a transformers "
            "checkpoint) or a torch.save(watch.state_dict()) file"
        )
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    model = None
    errors = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM, transformers.AutoModel):
        try:
            model = auto.from_pretrained(str(path), local_files_only=True)
            break
        except (ValueError, KeyError) as exc:
            errors.append(f"{auto.__name__}: {exc}")
    if model is None:
        raise ScanError(f"{path}: transformers cannot load this checkpoint ({'; '.join(errors)})")
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text_cfg, "vocab_size", 0) or 0)
    if vocab <= 0:
        raise ScanError(f"{path}/config.json has no vocab_size; moewatch scan needs it to make token ids")
    max_pos = getattr(text_cfg, "max_position_embeddings", None)
    if max_pos:
        seq_len = min(seq_len, int(max_pos))
    inputs, source = _token_batches(path, text_file, vocab, batches, batch_size, seq_len, seed)
    cfg = MoEWatchConfig(run_name=f"scan-{path.name}", window_steps=10**9, count_eval=True, probs_every=1)
    specs = discover_routers(model, cfg)
    model.eval()
    watch = Monitor(model, specs, cfg, sinks=[])
    try:
        with torch.no_grad():
            for ids_BS in inputs:
                kwargs: dict[str, Any] = {"input_ids": ids_BS}
                if getattr(config, "is_encoder_decoder", False):
                    kwargs["decoder_input_ids"] = ids_BS
                model(**kwargs)
                watch.step()
        report = watch.flush()
    finally:
        watch.close()
    return report, source


def scan_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Summarise a ``Monitor.state_dict()``: step, window, sink state and, when present, cumulative
    per-expert counts with their load CV and never-picked experts per layer."""
    from moewatch import metrics

    if not isinstance(state, dict) or "step" not in state:
        raise ScanError(
            f"this file holds a {type(state).__name__} without a 'step' key, not a Monitor.state_dict(); "
            "save one with torch.save(watch.state_dict(), PATH)"
        )
    out: dict[str, Any] = {
        "step": int(state["step"]),
        "window": int(state.get("window", 0)),
        "sinks": sorted((state.get("sinks") or {}).keys()),
        "keys": sorted(str(k) for k in state),
        "layers": None,
    }
    history = state.get("history")
    if isinstance(history, dict) and history.get("windows") and "cumulative" in history:  # moewatch.resume
        state = {**state, "cumulative": history["cumulative"]}
    key = next((k for k in _CUMULATIVE_KEYS if k in state), None)
    if key is None:
        key = next((k for k in state if "cumul" in str(k).lower()), None)
    if key is not None:
        raw = state[key]
        rows = raw.tolist() if hasattr(raw, "tolist") else list(raw)
        layers = []
        for i, row in enumerate(rows):
            loads = [int(v) for v in (row.tolist() if hasattr(row, "tolist") else row)]
            total = sum(loads)
            layers.append(
                {
                    "index": i,
                    "assignments": total,
                    "load_cov": metrics.load_cov(loads) if total else None,
                    "never_picked": [e for e, v in enumerate(loads) if v == 0],
                    "loads": loads,
                }
            )
        out["cumulative_key"] = key
        out["layers"] = layers
    return out


def _print_state(summary: dict[str, Any], path: Path) -> int:
    from rich import box
    from rich.table import Table

    from moewatch.sinks.console import wide_console

    con = wide_console()
    con.print(
        f"{path}: Monitor.state_dict() at step {summary['step']}, window {summary['window']}; "
        f"sink state: {', '.join(summary['sinks']) or 'none'}"
    )
    if summary["layers"] is None:
        con.print(
            "no cumulative per-expert counts in this state_dict (keys: "
            f"{', '.join(summary['keys'])}); run `moewatch scan` on the model checkpoint for health"
        )
        return 0
    table = Table(title=f"cumulative counts ({summary['cumulative_key']})", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("layer", "assignments", "load CV", "never picked"):
        table.add_column(col, justify="right")
    for layer in summary["layers"]:
        cov = layer["load_cov"]
        table.add_row(
            str(layer["index"]),
            str(layer["assignments"]),
            f"{cov:.3f}" if cov is not None else "-",
            ",".join(map(str, layer["never_picked"])) or "-",
        )
    con.print(table)
    return 1 if any(layer["never_picked"] for layer in summary["layers"]) else 0


def _run(args: argparse.Namespace) -> int:
    import json

    from moewatch.sinks.console import render_table, wide_console

    path: Path = args.path
    _check_path(path)
    if path.is_file():
        import pickle

        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            raise ScanError(
                f"{path} is neither a checkpoint directory nor a torch.save() file ({type(exc).__name__}); "
                "pass a save_pretrained() directory or a torch.save(watch.state_dict()) file"
            ) from None
        summary = scan_state_dict(state)
        if args.json is not None:
            args.json.write_text(json.dumps(summary) + "\n", encoding="utf-8")
        return _print_state(summary, path)
    t0 = time.perf_counter()
    report, source = scan_checkpoint(
        path, text_file=args.text, batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len,
        seed=args.seed,
    )
    con = wide_console()
    con.print(f"scanned {path} with {report.tokens} tokens from {source} in {time.perf_counter() - t0:.1f} s")
    con.print(render_table(report))
    for layer in report.layers:
        if layer.dead_expert_ids:
            con.print(f"layer {layer.index} ({layer.module}): dead experts {layer.dead_expert_ids}")
        for reason in layer.reasons if layer.state is not HealthState.HEALTHY else []:
            con.print(f"layer {layer.index}: {reason}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(report.model_dump_json() + "\n", encoding="utf-8")
    fail = HealthState(args.fail_on)
    bad = [layer.index for layer in report.layers if layer.state.severity >= fail.severity]
    con.print(f"result: {report.state.value}" + (f" (layers {bad} at or above {fail.value})" if bad else ""))
    return 1 if bad else 0


def register(sub: argparse._SubParsersAction) -> None:
    from moewatch.cliargs import positive

    p = sub.add_parser(
        "scan",
        help="router health of a saved checkpoint (no training run)",
        description="Load a local transformers MoE checkpoint (never the Hub), run sample batches with "
        "moewatch attached and print the per-layer health; exit 1 when a layer is collapsed. PATH may also "
        "be a torch.save(watch.state_dict()) file.",
    )
    p.add_argument("path", type=Path, help="checkpoint directory (save_pretrained) or state_dict file")
    p.add_argument("--text", type=Path, default=None, help="text file tokenized with the checkpoint's tokenizer")
    p.add_argument("--batches", type=positive(int), default=8, help="forward passes (default 8)")
    p.add_argument("--batch-size", type=positive(int), default=4, help="sequences per batch (default 4)")
    p.add_argument("--seq-len", type=positive(int), default=128, help="tokens per sequence (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for random tokens (default 0)")
    p.add_argument("--json", type=Path, default=None, help="write the report (one JSONL-log line) here")
    p.add_argument(
        "--fail-on", choices=("collapsed", "warning"), default="collapsed",
        help="exit 1 when any layer is at least this bad (default collapsed)",
    )
    p.set_defaults(func=_run)
