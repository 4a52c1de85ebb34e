"""MoEWatchConfig: environment, files, overrides, and errors that name the field."""

import pytest

from moewatch.config import ConfigError, MoEWatchConfig, build_config


def test_defaults():
    cfg = MoEWatchConfig()
    assert cfg.window_steps == 100
    assert cfg.min_fair_share == 0  # deprecated: noise-aware health replaces it
    assert cfg.false_alarm_rate == 1e-4
    assert cfg.dead_fraction == 0.01
    assert cfg.thresholds.load_cov_collapsed == 1.0
    assert cfg.run_name.startswith("run-")
    assert str(cfg.jsonl_path).endswith(f"moewatch-runs/{cfg.run_name}/windows.jsonl")


def test_env_prefix_and_nested_delimiter(monkeypatch):
    monkeypatch.setenv("MOEWATCH_WINDOW_STEPS", "7")
    monkeypatch.setenv("MOEWATCH_RUN_NAME", "pretrain-42")
    monkeypatch.setenv("MOEWATCH_THRESHOLDS__LOAD_COV_COLLAPSED", "1.5")
    monkeypatch.setenv("MOEWATCH_JSONL__ENABLED", "false")
    cfg = MoEWatchConfig()
    assert cfg.window_steps == 7
    assert cfg.run_name == "pretrain-42"
    assert cfg.thresholds.load_cov_collapsed == 1.5
    assert cfg.jsonl.enabled is False


def test_overrides_beat_env(monkeypatch):
    monkeypatch.setenv("MOEWATCH_WINDOW_STEPS", "7")
    assert build_config(None, {"window_steps": 3}).window_steps == 3


def test_overrides_merge_into_given_config():
    base = MoEWatchConfig(run_name="a", window_steps=5)
    merged = build_config(base, {"dead_fraction": 0.05})
    assert (merged.run_name, merged.window_steps, merged.dead_fraction) == ("a", 5, 0.05)


def test_bad_value_names_the_field_and_env_var():
    with pytest.raises(ConfigError) as err:
        build_config(None, {"window_steps": 0})
    msg = str(err.value)
    assert "window_steps" in msg and "MOEWATCH_WINDOW_STEPS" in msg and "greater than or equal to 1" in msg


def test_bad_env_value_names_the_field(monkeypatch):
    monkeypatch.setenv("MOEWATCH_THRESHOLDS__ENTROPY_WARNING", "lots")
    with pytest.raises(ConfigError, match="thresholds.entropy_warning"):
        build_config(None, {})


def test_unknown_field_is_rejected_with_the_valid_ones():
    with pytest.raises(ConfigError, match="window_step"):
        build_config(MoEWatchConfig(), {"window_step": 3})
    with pytest.raises(ConfigError, match="window_step"):
        build_config(None, {"window_step": 3})


def test_from_toml(tmp_path):
    p = tmp_path / "moewatch.toml"
    p.write_text('run_name = "from-toml"\nwindow_steps = 20\n[thresholds]\nload_cov_warning = 0.3\n')
    cfg = MoEWatchConfig.from_file(p)
    assert (cfg.run_name, cfg.window_steps, cfg.thresholds.load_cov_warning) == ("from-toml", 20, 0.3)


def test_from_yaml(tmp_path):
    p = tmp_path / "moewatch.yaml"
    p.write_text("run_name: from-yaml\njsonl:\n  path: /tmp/x.jsonl\n")
    cfg = MoEWatchConfig.from_file(p)
    assert cfg.run_name == "from-yaml" and str(cfg.jsonl_path) == "/tmp/x.jsonl"


def test_from_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        MoEWatchConfig.from_file(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("window_steps = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        MoEWatchConfig.from_file(bad)
    wrong = tmp_path / "c.yaml"
    wrong.write_text("window_steps: -1\n")
    with pytest.raises(ConfigError, match=r"window_steps.*c\.yaml|c\.yaml[\s\S]*window_steps"):
        MoEWatchConfig.from_file(wrong)
    txt = tmp_path / "c.ini"
    txt.write_text("x")
    with pytest.raises(ConfigError, match=".toml, .yaml"):
        MoEWatchConfig.from_file(txt)


def test_every_field_is_documented():
    def check(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                check(ann)

    check(MoEWatchConfig)


def test_settings_are_plain_data_that_dump_and_reload() -> None:
    """Callables (a router predicate, an extractor) are attach() arguments, never settings."""
    from moewatch.config import MoEWatchConfig

    cfg = MoEWatchConfig(run_name="r", routers=["layers.*.router"], window_steps=7)
    again = MoEWatchConfig.model_validate_json(cfg.model_dump_json())
    assert again.routers == ["layers.*.router"] and again.window_steps == 7
    assert "extractor" not in MoEWatchConfig.model_fields
