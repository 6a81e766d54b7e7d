"""Loss and metric ops for training sparse autoencoders on language-model activations.

The public surface is exactly ``__all__``; everything else lives in private modules.
"""

from sae_losses._losses import l1_absolute, l2_reconstruction

__all__ = ["l1_absolute", "l2_reconstruction"]
