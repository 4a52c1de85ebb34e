"""Tiny model testers for transformers' ``ModelTesterMixin`` (our own code, shaped like what the mixin reads).

``ModelTesterMixin`` needs, on the test case: ``all_model_classes`` and ``self.model_tester``; on the tester:
``prepare_config_and_inputs_for_common() -> (config, inputs_dict)``, ``get_config()``, ``batch_size``,
``seq_length``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads`` and ``is_training``.
"""

from __future__ import annotations

import unittest
from typing import Any

import hfsource
import torch

common = hfsource.load_common()


class TinyMoETester:
    """Two decoder layers of four experts, top-2: big enough for every code path, small enough to be quick."""

    batch_size = 3
    seq_length = 7
    vocab_size = 99
    hidden_size = 32
    num_hidden_layers = 2
    num_attention_heads = 4
    num_key_value_heads = 2
    head_dim = 8
    intermediate_size = 32  # grouped_mm (the experts kernel) needs 16-byte-aligned strides
    num_experts = 4
    top_k = 2
    is_training = True
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, parent: unittest.TestCase, config_class: type, **family: Any) -> None:
        self.parent = parent
        self.config_class = config_class
        self.family = family  # the family's own names for expert count, expert width, ...

    def get_config(self) -> Any:
        return self.config_class(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_act="silu",
            max_position_embeddings=64,
            initializer_range=0.02,
            num_experts_per_tok=self.top_k,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            **self.family,
        )

    def prepare_config_and_inputs(self) -> tuple[Any, torch.Tensor, torch.Tensor]:
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        # Random padding, but every row attends to its last token (as the mixin's own helper does).
        attention_mask = torch.randint(0, 2, (self.batch_size, self.seq_length), dtype=torch.long)
        attention_mask[:, -1] = 1
        return self.get_config(), input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self) -> tuple[Any, dict[str, torch.Tensor]]:
        config, input_ids, attention_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


class TinyMoETestBase(common.ModelTesterMixin, hfsource.GenerationTesterMixin):
    """Mixed into ``unittest.TestCase`` per family. ``GenerationTesterMixin`` is the empty stand-in (the
    sdist lacks generation/test_utils.py): it makes ``test_generation_tester_mixin_inheritance`` pass for
    models that can generate, while no generate() test runs."""

    config_class: type
    family: dict[str, Any]
    # MoE: experts no token was routed to get no gradient in a tiny batch (upstream's MoE tests say the same).
    test_all_params_have_gradient = False

    def setUp(self) -> None:
        self.model_tester = TinyMoETester(self, self.config_class, **self.family)

    def test_tiny_forward_shapes(self) -> None:
        """Our own smoke test: every class runs a forward on the tiny inputs, in eval and in train mode."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).to(common.torch_device)
            for training in (False, True):
                model.train(training)
                out = model(**self._prepare_for_class(inputs, model_class, return_labels=True))
                self.assertIsNotNone(out[0])
