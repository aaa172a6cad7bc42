"""The ``nemotron-nas`` (DeciLM) model, registered with transformers' Auto classes on import.

``save_pretrained`` copies ``configuration_decilm.py`` and ``modeling_decilm.py`` into the checkpoint and
writes ``auto_map`` into ``config.json``, so the folder also loads with ``trust_remote_code=True`` in a
process that never imports thinkfast, as the released Nemotron checkpoints do. A reward model
(:class:`DeciLMForSequenceClassification`) is saved the same way, its class under
``AutoModelForSequenceClassification``.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_decilm import (
    AttentionSpec,
    DeciLMConfig,
    FFNSpec,
    attention_block,
    block_config,
    ffn_block,
    ffn_mult_to_intermediate_size,
    intermediate_size_to_ffn_mult,
)
from .modeling_decilm import DeciLMForCausalLM, DeciLMForSequenceClassification, DeciLMModel

try:
    AutoConfig.register(DeciLMConfig.model_type, DeciLMConfig)
    AutoModelForCausalLM.register(DeciLMConfig, DeciLMForCausalLM)
except ValueError:  # already registered (module reloaded)
    pass
try:
    AutoModelForSequenceClassification.register(DeciLMConfig, DeciLMForSequenceClassification)
except ValueError:
    pass
DeciLMConfig.register_for_auto_class()
DeciLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
# a reward model's folder (thinkfast.rl.reward_model) names its class for AutoModelForSequenceClassification
DeciLMForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "AttentionSpec",
    "DeciLMConfig",
    "DeciLMForCausalLM",
    "DeciLMForSequenceClassification",
    "DeciLMModel",
    "FFNSpec",
    "attention_block",
    "block_config",
    "ffn_block",
    "ffn_mult_to_intermediate_size",
    "intermediate_size_to_ffn_mult",
]
