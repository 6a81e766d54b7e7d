"""Loss and metric ops for training sparse autoencoders on language-model activations.

The public surface is exactly ``__all__``; everything else lives in private modules.
"""

from sae_losses._counts import jumprelu_l0, l0_norm
from sae_losses._distributed import PendingAllReduce, all_reduce
from sae_losses._fused import fused_l1_absolute, fused_l2_reconstruction
from sae_losses._fvu import fraction_of_variance_unexplained
from sae_losses._penalties import l1_absolute, lp_sparsity, tanh_sparsity
from sae_losses._reconstruction import l2_reconstruction
from sae_losses._streaming import StreamingMean
from sae_losses._streaming_fvu import StreamingFVU
from sae_losses._version import __version__

__all__ = [
    "PendingAllReduce",
    "StreamingFVU",
    "StreamingMean",
    "__version__",
    "all_reduce",
    "fraction_of_variance_unexplained",
    "fused_l1_absolute",
    "fused_l2_reconstruction",
    "jumprelu_l0",
    "l0_norm",
    "l1_absolute",
    "l2_reconstruction",
    "lp_sparsity",
    "tanh_sparsity",
]
