"""thinkfast: turn a Llama-family model into an efficient reasoning model, the Llama-Nemotron way.

Importing thinkfast registers the ``nemotron-nas`` (DeciLM) model with transformers' Auto classes.
"""

__version__ = "0.1.0"

from .modeling import DeciLMConfig, DeciLMForCausalLM  # noqa: E402  (registers the Auto classes)

__all__ = ["DeciLMConfig", "DeciLMForCausalLM", "__version__"]
