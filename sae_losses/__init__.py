"""Loss and metric ops for training sparse autoencoders on language-model activations.

The public surface is exactly ``__all__``; everything else lives in private modules.
"""

from sae_losses._auxk import auxk_loss, auxk_reconstruction
from sae_losses._counts import l0_norm
from sae_losses._cross_entropy import cross_entropy
from sae_losses._dead_latents import TokensSinceFired
from sae_losses._distributed import PendingAllReduce, all_reduce
from sae_losses._fused import fused_l1_absolute, fused_l2_reconstruction
from sae_losses._fused_terms import (
    fused_fraction_of_variance_unexplained,
    fused_jumprelu_l0,
    fused_l0_norm,
    fused_lp_sparsity,
    fused_tanh_sparsity,
)
from sae_losses._fvu import fraction_of_variance_unexplained
from sae_losses._jumprelu import jumprelu_l0
from sae_losses._kl import kl_divergence
from sae_losses._matryoshka import matryoshka_l2
from sae_losses._norm_ratio import l2_norm_ratio
from sae_losses._penalties import l1_absolute, lp_sparsity
from sae_losses._reconstruction import l2_reconstruction
from sae_losses._reconstruction_bias import StreamingReconstructionBias
from sae_losses._similarity import cosine_similarity
from sae_losses._splice_scores import StreamingSpliceScores
from sae_losses._streaming import StreamingMean
from sae_losses._streaming_fvu import StreamingFVU
from sae_losses._tanh import tanh_sparsity
from sae_losses._version import __version__

__all__ = [
    "PendingAllReduce",
    "StreamingFVU",
    "StreamingMean",
    "StreamingReconstructionBias",
    "StreamingSpliceScores",
    "TokensSinceFired",
    "__version__",
    "all_reduce",
    "auxk_loss",
    "auxk_reconstruction",
    "cosine_similarity",
    "cross_entropy",
    "fraction_of_variance_unexplained",
    "fused_fraction_of_variance_unexplained",
    "fused_jumprelu_l0",
    "fused_l0_norm",
    "fused_l1_absolute",
    "fused_l2_reconstruction",
    "fused_lp_sparsity",
    "fused_tanh_sparsity",
    "jumprelu_l0",
    "kl_divergence",
    "l0_norm",
    "l1_absolute",
    "l2_norm_ratio",
    "l2_reconstruction",
    "lp_sparsity",
    "matryoshka_l2",
    "tanh_sparsity",
]
