"""A tiny transformer language model on a synthetic language, trained in-process in seconds.

No weights can be downloaded on the machines this runs on, and a random model would make the
downstream scores meaningless, so examples/evaluate.py trains this one first. The language is a
fixed random Markov chain of order 2 with a few likely successors per context: a model has to
use the previous two tokens to get its loss well below the unigram entropy, so its residual
stream carries information that an SAE can lose.

Everything is seeded and runs in one thread, so every rank of a torchrun job trains bit-identical
weights.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

BOS = 0  # every sequence starts with it; it is never predicted


class SyntheticLanguage:
    """Sequences ``[BOS, t_1, ..., t_n]``: t_i depends on t_{i-2} and t_{i-1} (order 2)."""

    def __init__(self, vocab: int, seed: int, successors: int = 3) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.vocab, self.seed = vocab, seed
        contexts = vocab * vocab
        self.successors = torch.randint(1, vocab, (contexts, successors), generator=generator)
        self.weights = torch.softmax(2 * torch.randn(contexts, successors, generator=generator), -1)

    def batch(self, index: int, rows: int, length: int) -> torch.Tensor:
        """``(rows, length)`` int64 tokens of batch ``index``: a pure function of the seed."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        tokens = torch.full((rows, length), BOS, dtype=torch.int64)
        tokens[:, 1] = torch.randint(1, self.vocab, (rows,), generator=generator)
        for position in range(2, length):
            context = tokens[:, position - 2] * self.vocab + tokens[:, position - 1]
            choice = torch.multinomial(self.weights[context], 1, generator=generator)[:, 0]
            tokens[:, position] = self.successors[context, choice]
        return tokens


class TinyTransformer(nn.Module):
    """Embedding, one pre-norm attention + MLP block, final norm and unembedding.

    ``forward(tokens, splice=f)`` replaces the residual stream after the block (the SAE's hook
    point) by ``f(resid)``: the identity for clean logits, an SAE for spliced ones, zeros for
    the zero ablation.
    """

    def __init__(self, vocab: int, d_model: int, length: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(0.1 * torch.randn(length, d_model))
        self.norm_attention, self.norm_mlp = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.out = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )
        self.norm_final, self.unembed = nn.LayerNorm(d_model), nn.Linear(d_model, vocab)
        self.heads = 4

    def residual(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(batch, length, d_model)``: the residual stream after the block (the hook point)."""
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        q, k, v = self.qkv(self.norm_attention(x)).chunk(3, dim=-1)
        shape = (*tokens.shape, self.heads, -1)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.norm_mlp(x))

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.norm_final(resid))

    def forward(self, tokens: torch.Tensor, splice=None) -> torch.Tensor:
        resid = self.residual(tokens)
        return self.logits(resid if splice is None else splice(resid))


def train_language_model(
    language: SyntheticLanguage, *, d_model: int, length: int, steps: int, seed: int
) -> TinyTransformer:
    """Next-token cross-entropy with Adam; a few seconds on one CPU thread."""
    model = TinyTransformer(language.vocab, d_model, length, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        tokens = language.batch(step, 64, length)
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return model.requires_grad_(False)


def unigram_entropy(vocab: int) -> float:
    """The loss of a model that ignores the context entirely (uniform over tokens 1..vocab-1)."""
    return math.log(vocab - 1)
