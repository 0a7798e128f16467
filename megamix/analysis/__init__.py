"""Layer effectiveness: how much each layer does, measured the way the norm-placement papers do.

- ``hidden_states``: run the model block by block (see between layers, or leave one out)
- ``angular``: angular distance between a layer's input and output (Gromov et al.)
- ``pruning``: validation loss with each layer removed
- ``grad_norms``: per-layer gradient norms of a checkpoint
- ``report``: all three for one checkpoint → layers.json, PNGs, TensorBoard
- ``runs``, ``compare``, ``plots``: reading run directories, comparing runs, drawing the figures
"""
