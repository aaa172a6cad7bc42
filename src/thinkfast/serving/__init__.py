"""Serving: the OpenAI-compatible HTTP server (:mod:`.app`, request bodies in :mod:`.protocol`, ``thinkfast serve``
in :mod:`.server`) over continuous batching (:mod:`thinkfast.generation.continuous`)."""
