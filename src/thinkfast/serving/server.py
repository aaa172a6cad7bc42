"""``thinkfast serve``: load a model folder and run the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

from pathlib import Path

from .app import ServerState, build_app

__all__ = ["load_state", "serve"]


def load_state(model_dir: str | Path, *, engine: str = "continuous", max_batch: int = 32,
               max_model_len: int | None = None, served_model_name: str | None = None, device: str = "auto",
               seed: int = 0, threads: int | None = None) -> ServerState:
    """Load ``model_dir`` (any folder thinkfast loads: nemotron-nas or Llama layout) and start its engine:
    ``continuous`` (continuous batching on the rollout engine) or ``generate`` (transformers' plain generate
    loop, one request at a time: the load test's baseline)."""
    import torch
    from transformers import AutoTokenizer

    from ..artifacts import load_model
    from ..toggle import stop_token_ids
    from ..generation.continuous import ContinuousEngine, SequentialGenerateEngine

    if engine not in ("continuous", "generate"):
        raise ValueError(f"engine={engine!r}: choose continuous or generate")
    if threads is not None and threads < 1 or max_batch < 1:
        raise ValueError(f"threads={threads} and max_batch={max_batch} must be >= 1")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_dir, device=device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 2048
    if max_model_len is not None:
        if not 1 < max_model_len <= limit:
            raise ValueError(f"max_model_len={max_model_len} must be in [2, {limit}] (the model's positions)")
        limit = max_model_len
    cls = ContinuousEngine if engine == "continuous" else SequentialGenerateEngine
    eng = cls(model, tokenizer, max_batch=max_batch, seed=seed, threads=threads).start()
    return ServerState(engine=eng, tokenizer=tokenizer, model_name=served_model_name or str(model_dir),
                       max_model_len=limit, stop_token_ids=tuple(stop_token_ids(tokenizer)))


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    import uvicorn

    state = load_state(model_dir, **kwargs)
    try:
        uvicorn.run(build_app(state), host=host, port=port, log_level="info")
    finally:
        state.engine.stop()
