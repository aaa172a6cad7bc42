"""Generation: the backends that evaluation and RL sample through (:class:`~.sampler.Backend`: the local
rollout engine :class:`~.sampler.LocalBackend`, an OpenAI-compatible server :class:`~.endpoint.Endpoint`), the
rollout engine itself (:mod:`.sampler`), continuous batching for the server (:mod:`.continuous`) and the
thinking budget (:mod:`.budget`)."""

from .sampler import (MIN_TEMPERATURE, SEED_RANGE, Backend, Completion, LocalBackend, SamplingParams, StepView,
                      filter_logits, generate, left_padded)

__all__ = ["MIN_TEMPERATURE", "SEED_RANGE", "Backend", "Completion", "LocalBackend", "SamplingParams", "StepView",
           "filter_logits", "generate", "left_padded"]
