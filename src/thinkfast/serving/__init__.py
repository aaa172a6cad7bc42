"""Serving: continuous batching on the rollout engine (:mod:`.engine`) behind an OpenAI-compatible HTTP server
(:mod:`.app`)."""
