"""The transformers MoE sweep (machinery in ``tests/sweep_hf.py``): every model type transformers 5.x ships
whose config names an expert count, built from one generic tiny config on the CPU, trained one step with
moewatch attached. Each type must have the outcome listed here: ``exact`` (moewatch's loads equal the
counts read from every router's own output), or one of the reasons the README lists as unsupported or not
covered. A type transformers adds later fails the test until it is classified.
"""

from __future__ import annotations

from typing import Any

import pytest
import transformers
from sweep_hf import sweep

#: Counted exactly from the generic tiny config.
EXACT = {"afmoe", "aria_text", "axk1", "cohere2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v4", "dots1", "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint", "glm4_moe", "glm4_moe_lite", "gpt_oss", "granitemoe", "granitemoe_swa", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "inkling2_loop_text", "inkling2_text", "inkling_text", "jetmoe", "kimi_linear", "kolibri1", "laguna", "lara_mini", "llama4_text", "mellum", "mimo_v2_flash", "minimax", "minimax_m2", "minimax_m3_vl_text", "mistral4", "mixtral", "muse_spark_text", "nemotron_h", "olmoe", "openai_privacy_filter", "phimoe", "qwen2_moe", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next", "qwen3_vl_moe_text", "qwen4_exp_text", "sarvam_mla", "sarvam_moe", "solar_open", }  # fmt: skip

#: Not exact in the sweep, with why. "covered" types are counted exactly by tests/test_adapters_transformers.py
#: from hand-made tiny configs (their layouts or configs need more than the generic one).
OTHER = {
    "dbrx": "covered",  # attention config needs rope_theta set by hand
    "gemma4_text": "covered",  # per-layer head_dim
    "jamba": "covered",  # read-only layer_types
    "nllb-moe": "covered",  # combine weights after capacity: the generic reference cannot read them
    "switch_transformers": "covered",  # one-hot after capacity
    "zaya": "unsupported",  # router MLP with an extra skip-expert class: needs extractor=
    "axk2": "tiny_config",
    "dots3_note_text": "tiny_config",
    "glm4v_moe_text": "tiny_config",
    "granitemoehybrid": "tiny_config",
    "hy_v4": "tiny_config",
    "hy_v4_vl_text": "tiny_config",
    "lfm2_moe": "tiny_config",
    "mistral_large4_text": "tiny_config",
    "bailing_hybrid": "no_moe_layer",
    "beam": "no_moe_layer",
    "deepseek_v32": "no_moe_layer",
    "doge": "no_moe_layer",
    "glm5_next_text": "no_moe_layer",
    "glm_moe_dsa": "no_moe_layer",
    "longcat_flash": "no_moe_layer",
}

_STATUS = {
    "covered": {"build_failed", "step_failed", "mismatch"},
    "tiny_config": {"build_failed", "step_failed"},
    "unsupported": {"no_router"},
    "no_moe_layer": {"no_router"},
}


#: The release the tables above describe: the transformers of .venv (constraints-frameworks.txt).
TABLE_VERSION = "5.24.0"

#: Other releases of the matrix (.ci/transformers-matrix): types moewatch refuses at attach there
#: (NoRouterFoundError), with why, and the fewest types that must count exactly.
OTHER_RELEASES: dict[str, tuple[dict[str, str], int]] = {
    # aria_text: in 5.0-5.5 its experts module makes the top-k from the router logits itself (k in
    # config.moe_topk); doge: no MoE layer in the tiny config.
    "5.0.0": ({"aria_text": "top-k inside AriaExperts", "doge": "no_moe_layer"}, 20),
    "5.5.4": (
        {"aria_text": "top-k inside AriaExperts", "doge": "no_moe_layer", "gemma4_text": "per-layer config",
         "glm_moe_dsa": "no_moe_layer"},
        25,
    ),  # fmt: skip
    # The newest release: TABLE_VERSION's refusals (zaya needs extractor=, the rest have no MoE layer in the
    # tiny config) and 54 exact types, 4 more than 5.24 has.
    "5.25.0": ({mt: why for mt, why in OTHER.items() if why in ("unsupported", "no_moe_layer")}, 54),
}


def _check_other_release(outcomes: dict[str, Any]) -> None:
    """Outside TABLE_VERSION the tables do not apply; what must hold on every release: no router is ever
    counted wrong or read with errors (the generic reference cannot read Switch / NLLB's capacity outputs,
    which tests/test_adapters_transformers.py covers on TABLE_VERSION), refusals are the listed ones, and at
    least the listed number of types count exactly."""
    refused, min_exact = OTHER_RELEASES[transformers.__version__]
    wrong = {
        mt: (o.status, o.detail)
        for mt, o in outcomes.items()
        if o.status == "hook_errors" or (o.status == "mismatch" and OTHER.get(mt) != "covered")
    }
    assert not wrong, wrong
    assert sorted(mt for mt, o in outcomes.items() if o.status == "no_router") == sorted(refused)
    assert sum(o.status == "exact" for o in outcomes.values()) >= min_exact


@pytest.mark.timeout(900)
def test_every_moe_model_type_counts_exactly_or_is_listed() -> None:
    assert transformers.__version__.startswith("5."), transformers.__version__
    outcomes = {o.model_type: o for o in sweep()}
    if transformers.__version__ != TABLE_VERSION:
        assert transformers.__version__ in OTHER_RELEASES, (
            f"transformers {transformers.__version__} is neither TABLE_VERSION nor in OTHER_RELEASES: add it"
        )
        _check_other_release(outcomes)
        return
    unlisted = sorted(set(outcomes) - EXACT - set(OTHER))
    assert not unlisted, f"new MoE model types, classify them in EXACT or OTHER: {unlisted}"
    wrong = {
        mt: (o.status, o.detail)
        for mt, o in outcomes.items()
        if (mt in EXACT and o.status != "exact") or (mt in OTHER and o.status not in _STATUS[OTHER[mt]])
    }
    assert not wrong, wrong
    assert all(outcomes[mt].routers > 0 for mt in EXACT if mt in outcomes)
    assert len(EXACT & set(outcomes)) >= 50
