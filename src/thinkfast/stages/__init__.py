"""Pipeline stages: one module per stage, each with a config dataclass and ``run(cfg, stage, model_dir)``.

Stages never import each other; what they share lives here.
"""

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
