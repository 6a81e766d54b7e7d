"""Loss and metric ops for training sparse autoencoders on language-model activations.

The public surface is exactly ``__all__``; everything else lives in private modules.
"""

from sae_losses._distributed import PendingAllReduce, all_reduce
from sae_losses._fused import fused_l1_absolute, fused_l2_reconstruction
from sae_losses._losses import l1_absolute, l2_reconstruction
from sae_losses._streaming import StreamingMean

__all__ = [
    "PendingAllReduce",
    "StreamingMean",
    "all_reduce",
    "fused_l1_absolute",
    "fused_l2_reconstruction",
    "l1_absolute",
    "l2_reconstruction",
]
