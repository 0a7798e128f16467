"""megamix: a Megatron-style 3D-parallel LLaMA trainer with per-layer norm placement.

Imports stay lazy so that torch-free tools (the C4 preprocessor) can use ``megamix.data.indexed``
without paying for torch.
"""

__version__ = "0.1.0"


def load_model(checkpoint_dir, device="cpu"):
    """A single-process model from a checkpoint of any layout (or a run directory's latest)."""
    from megamix.checkpoint import load_model as _load

    return _load(checkpoint_dir, device=device)


__all__ = ["load_model", "__version__"]
