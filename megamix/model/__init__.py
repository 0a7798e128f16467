"""The single-device LLaMA with per-layer norm placement."""

from megamix.model.llama import Block, Transformer, num_parameters
from megamix.model.placement import layer_placements, num_post_ln_layers

__all__ = ["Block", "Transformer", "layer_placements", "num_parameters", "num_post_ln_layers"]
