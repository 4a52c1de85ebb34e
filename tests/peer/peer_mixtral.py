"""transformers' ModelTesterMixin over tiny Mixtral models (see tiny_moe.py, tests/test_peer_suite.py)."""

import unittest

from tiny_moe import TinyMoETestBase
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    MixtralForQuestionAnswering,
    MixtralForSequenceClassification,
    MixtralForTokenClassification,
    MixtralModel,
)


class MixtralPeerTest(TinyMoETestBase, unittest.TestCase):
    config_class = MixtralConfig
    family = {"num_local_experts": 4, "head_dim": 8}
    all_model_classes = (
        MixtralModel,
        MixtralForCausalLM,
        MixtralForSequenceClassification,
        MixtralForTokenClassification,
        MixtralForQuestionAnswering,
    )
