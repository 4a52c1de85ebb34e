"""``moewatch scan`` on real transformers checkpoints saved to a temporary directory (no Hub access)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers  # a test extra: missing, it fails the run (no skip), like every transformers test

from moewatch.cli import main
from moewatch.report import HealthState, WindowReport

E, K = 8, 2
DEAD = [5, 6, 7]


def _save_mixtral(tmp_path: Path, kill: list[int] | None = None) -> Path:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, num_local_experts=E, num_experts_per_tok=K,
    )
    model = transformers.MixtralForCausalLM(config)
    if kill:
        # Killed experts get a zero weight row (logit exactly 0); the live ones come in mirrored pairs (w, -w),
        # so every token has at least two live logits > 0 and the killed experts can never be in its top-2.
        with torch.no_grad():
            for layer in model.model.layers:
                weight_ED = layer.mlp.gate.weight
                weight_ED[kill] = 0.0
                live = [e for e in range(E) if e not in kill]
                for a, b in zip(live[0::2], live[1::2], strict=False):
                    weight_ED[b] = -weight_ED[a]
    out = tmp_path / ("ckpt-dead" if kill else "ckpt")
    model.save_pretrained(out)
    return out


def test_healthy_checkpoint_scans_healthy_and_writes_the_jsonl_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _save_mixtral(tmp_path)
    out = tmp_path / "scan.json"
    rc = main(["scan", str(ckpt), "--json", str(out), "--batches", "4", "--seq-len", "64"])
    text = " ".join(capsys.readouterr().out.split())
    assert rc == 0, text
    report = WindowReport.model_validate_json(out.read_text().strip())
    assert len(report.layers) == 2
    assert all(layer.state is not HealthState.COLLAPSED for layer in report.layers)
    assert all(layer.dead_experts == 0 for layer in report.layers)
    assert report.tokens == 4 * 4 * 64
    assert all(layer.assignments == report.tokens * K for layer in report.layers)
    assert "random tokens (seed 0)" in text and "result:" in text


def test_qwen3_moe_checkpoint_scans(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, num_experts=E, num_experts_per_tok=K,
        moe_intermediate_size=16, head_dim=16,
    )
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "qwen")
    out = tmp_path / "scan.json"
    assert main(["scan", str(tmp_path / "qwen"), "--json", str(out), "--batches", "4", "--seq-len", "64"]) == 0
    report = WindowReport.model_validate_json(out.read_text().strip())
    assert [layer.module for layer in report.layers] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert all(layer.assignments == 4 * 4 * 64 * K and layer.dead_experts == 0 for layer in report.layers)


def test_router_edited_so_experts_never_win_is_reported_dead_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _save_mixtral(tmp_path, kill=DEAD)
    out = tmp_path / "scan.json"
    rc = main(["scan", str(ckpt), "--json", str(out), "--batches", "4", "--seq-len", "64"])
    text = " ".join(capsys.readouterr().out.split())
    assert rc == 1, text
    report = WindowReport.model_validate_json(out.read_text().strip())
    for layer in report.layers:
        assert layer.dead_expert_ids == DEAD
        assert layer.state is HealthState.COLLAPSED
    assert f"dead experts {DEAD}" in text


def test_text_file_goes_through_the_checkpoints_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _save_mixtral(tmp_path)
    words = ["the", "router", "sends", "each", "token", "to", "two", "experts", "of", "eight"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(ckpt)
    text_file = tmp_path / "sample.txt"
    text_file.write_text(" ".join(words * 5), encoding="utf-8")
    out = tmp_path / "scan.json"
    rc = main(["scan", str(ckpt), "--text", str(text_file), "--json", str(out), "--batches", "2"])
    text = " ".join(capsys.readouterr().out.split())
    assert rc in (0, 1)
    assert "sample.txt through the checkpoint's tokenizer (50 tokens" in text
    report = WindowReport.model_validate_json(out.read_text().strip())
    assert report.tokens == 2 * 4 * 64


def test_missing_path_and_hub_id_get_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such file or directory" in err and "config.json" in err
    assert main(["scan", "mistralai/Mixtral-8x7B-v0.1"]) == 2
    err = capsys.readouterr().err
    assert "Hugging Face Hub id" in err and "never downloads" in err
    (tmp_path / "empty").mkdir()
    assert main(["scan", str(tmp_path / "empty")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_state_dict_file_reports_what_it_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import moewatch
    from tests.fakes import ToyMoE, quiet

    watch = moewatch.attach(ToyMoE(), **quiet(window_steps=1))
    try:
        path = tmp_path / "moewatch.pt"
        torch.save(watch.state_dict(), path)
    finally:
        watch.close()
    rc = main(["scan", str(path)])
    text = capsys.readouterr().out
    assert rc == 0 and "Monitor.state_dict() at step 0" in text

    torch.save({"step": 40, "window": 4, "sinks": {}, "cumulative_counts": torch.tensor([[5, 5, 0, 6]])}, path)
    rc = main(["scan", str(path), "--json", str(tmp_path / "s.json")])
    text = capsys.readouterr().out
    assert rc == 1 and "never picked" in text
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["layers"][0]["never_picked"] == [2]

    torch.save([1, 2, 3], path)
    assert main(["scan", str(path)]) == 2
    assert "not a Monitor.state_dict()" in capsys.readouterr().err


def test_real_monitor_state_with_history_reports_never_picked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import moewatch
    from tests.fakes import ToyMoE, quiet, tokens_for

    model = ToyMoE(num_experts=4, top_k=2)
    with moewatch.attach(model, **quiet(window_steps=1)) as watch:
        for _ in range(3):
            model(tokens_for([[0, 1], [1, 2], [0, 2]])).sum().backward()
            watch.step()
        path = tmp_path / "moewatch.pt"
        torch.save(watch.state_dict(), path)
    rc = main(["scan", str(path), "--json", str(tmp_path / "s.json")])
    capsys.readouterr()
    summary = json.loads((tmp_path / "s.json").read_text())
    assert rc == 1 and [layer["never_picked"] for layer in summary["layers"]] == [[3], [3]]
    assert summary["layers"][0]["loads"] == [6, 6, 6, 0]  # cumulative over the three windows
