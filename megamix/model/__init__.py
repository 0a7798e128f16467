"""The single-device LLaMA with per-layer norm schemes, and its loss."""

from megamix.model.llama import Block, Transformer, layer_of, num_parameters
from megamix.model.loss import lm_loss, log_z_squared

__all__ = ["Block", "Transformer", "layer_of", "lm_loss", "log_z_squared", "num_parameters"]
