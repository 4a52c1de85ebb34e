"""transformers' ModelTesterMixin over tiny Qwen3-MoE models (see tiny_moe.py, tests/test_peer_suite.py)."""

import unittest

from tiny_moe import TinyMoETestBase
from transformers import (
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3MoeForQuestionAnswering,
    Qwen3MoeForSequenceClassification,
    Qwen3MoeForTokenClassification,
    Qwen3MoeModel,
)


class Qwen3MoePeerTest(TinyMoETestBase, unittest.TestCase):
    config_class = Qwen3MoeConfig
    family = {
        "num_experts": 4,
        "moe_intermediate_size": 16,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    }
    all_model_classes = (
        Qwen3MoeModel,
        Qwen3MoeForCausalLM,
        Qwen3MoeForSequenceClassification,
        Qwen3MoeForTokenClassification,
        Qwen3MoeForQuestionAnswering,
    )
