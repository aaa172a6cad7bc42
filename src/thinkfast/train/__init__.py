"""Shared training parts: resumable checkpoints (:mod:`thinkfast.train.checkpoint`)."""
