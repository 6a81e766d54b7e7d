"""TokensSinceFired: the tokens since each latent last fired, synced across ranks in one collective.

AuxK needs to know which latents are dead. sparsify and dictionary_learning count the tokens
since each latent last fired and call a latent dead past 10M; SAELens counts forward passes. A
training loop keeps one :class:`TokensSinceFired` and replaces it every step::

    >>> import torch
    >>> from sae_losses import TokensSinceFired
    >>> tracker = TokensSinceFired.empty(3)
    >>> for latents in ([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]], [[0.0, 0.0, 3.0]]):
    ...     tracker = tracker.update(torch.tensor(latents))
    >>> tracker.since_fired  # latent 0 never fired (3 tokens); 1 fired 1 token ago; 2 just now
    tensor([3, 1, 0])
    >>> tracker.dead(threshold=2)
    tensor([ True, False, False])

Under ``torch.distributed``, every :meth:`~TokensSinceFired.update` is one ``all_reduce`` (a sum
of one int64 buffer: which latents fired on this rank, its token count and a fingerprint of its
state), so every rank holds the state one process would have from the step's rows of every rank
concatenated. Nothing in it reads a value back to the host, unless ``check="host"``.
"""

import dataclasses
from typing import Literal

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from jaxtyping import Bool, Float, Int64
from torch import Tensor

from sae_losses._checks import check_floating, describe, shape_str
from sae_losses._fired_fingerprint import mismatch_message, state_fingerprint
from sae_losses._masks import check_mask

__all__ = ["TokensSinceFired"]


@dataclasses.dataclass(frozen=True, eq=False)
class TokensSinceFired:
    r"""The tokens since each latent last fired, and the tokens counted so far.

    .. math::

        s'_f = \begin{cases} 0 & \text{if } z_{b,f} \ne 0 \text{ for a kept row } b
               \text{ of any rank,} \\ s_f + n & \text{otherwise,} \end{cases}
        \qquad t' = t + n

    with :math:`n` the step's kept rows over every rank. A latent fires when it is nonzero in a
    row: a TopK latent that topk selected at exactly 0 has not fired (sparsify and
    dictionary_learning count every selected index). It is immutable: :meth:`update` returns a
    new tracker. Construction checks metadata only, so it never syncs with the device.

    Fields:
        - ``since_fired``: ``(latent,)`` int64, the tokens since each latent last fired.
        - ``tokens``: 0-d int64, the tokens counted so far.

    Raises:
        TypeError: a field is not an int64 tensor of its number of dimensions.
        ValueError: the fields are on different devices.
    """

    since_fired: Int64[Tensor, " latent"]
    tokens: Int64[Tensor, ""]

    def __post_init__(self) -> None:
        for name, ndim in (("since_fired", 1), ("tokens", 0)):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dtype != torch.int64 or value.ndim != ndim:
                raise TypeError(f"`{name}` must be a {ndim}-d int64 tensor, got {describe(value)}.")
        if self.tokens.device != self.since_fired.device:
            raise ValueError(
                f"`tokens` is on {self.tokens.device} but `since_fired` is on "
                f"{self.since_fired.device}."
            )

    @classmethod
    def empty(cls, latents: int, *, device: torch.device | str | None = None) -> "TokensSinceFired":
        """A tracker of ``latents`` latents that has counted no token yet."""
        if isinstance(latents, bool) or not isinstance(latents, int) or latents < 1:
            raise ValueError(f"`latents` must be a positive Python int, got {latents!r}.")
        zeros = torch.zeros(latents, dtype=torch.int64, device=device)
        return cls(zeros, torch.zeros((), dtype=torch.int64, device=device))

    def update(
        self,
        latents: Float[Tensor, "batch latent"],
        *,
        mask: Bool[Tensor, " batch"] | None = None,
        group: dist.ProcessGroup | None = None,
        check: Literal["device", "host"] = "device",
    ) -> "TokensSinceFired":
        """The tracker after one step of ``latents``, over every rank of ``group``.

        Rows that ``mask`` drops (padding) neither fire nor count as tokens, even holding NaN.
        When ``torch.distributed`` is initialised, every rank of ``group`` (the default group
        when None) must call it once per step, with the same tracker state; each passes its
        own rows, any number of them. That is checked with a fingerprint of the state in the
        same collective. ``check="device"`` checks it with ``torch._assert_async``, with no
        host sync: on the CPU a mismatch raises a ``RuntimeError`` on every rank at once; on
        CUDA it is a device-side assert, which surfaces at the next sync as ``RuntimeError:
        CUDA error: device-side assert triggered`` and leaves that process's CUDA context
        unusable (restart it from a checkpoint). ``check="host"`` reads the check back, a
        host sync, and raises a ``ValueError`` that says what went wrong. Ranks whose latent
        counts differ cannot be checked: their buffers have different lengths, and the
        collective itself fails or hangs.

        Raises:
            TypeError: ``latents`` is not a floating-point tensor, or ``mask`` is not bool.
            ValueError: ``latents`` is not ``(batch, latent)`` on the tracker's device,
                ``mask`` is not ``(batch,)``, ``check`` is not ``"device"`` or ``"host"``,
                this rank is not in ``group``, or (``check="host"``) the ranks' states differ.
            RuntimeError: (``check="device"``, on the CPU) the ranks' states differ.
        """
        latents = check_floating("latents", latents)
        count = self.since_fired.shape[0]
        if latents.ndim != 2 or latents.shape[1] != count:
            raise ValueError(
                f"`latents` must have shape (batch, latent) = (batch, {count}), "
                f"got shape {shape_str(latents)}."
            )
        if latents.device != self.since_fired.device:
            raise ValueError(
                f"`latents` is on {latents.device} but the tracker is on {self.since_fired.device}."
            )
        if check not in ("device", "host"):
            raise ValueError(f"`check` must be 'device' or 'host', got {check!r}.")
        keep = check_mask(mask, latents, weights_allowed=False)
        with torch.no_grad():
            active = latents != 0
            if keep is None:
                rows = torch.full((1,), latents.shape[0], dtype=torch.int64, device=latents.device)
            else:
                active = active & keep[:, None]
                rows = keep.sum().reshape(1)
            fingerprint = state_fingerprint(self.since_fired, self.tokens)
            fired = active.any(0).to(torch.int64)
            buffer = torch.cat([fired, rows, fingerprint, fingerprint * fingerprint])
            world = 1
            if dist.is_available() and dist.is_initialized():
                if dist.get_rank(group) < 0:
                    raise ValueError(
                        "TokensSinceFired.update: this rank is not a member of `group`."
                    )
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
                world = dist.get_world_size(group)
            step_tokens, total, squares = buffer[count], buffer[count + 1], buffer[count + 2]
            # Cauchy-Schwarz: (sum f)^2 = world * sum f^2 exactly when every f is the same.
            agree = total * total == world * squares
            if check == "host":
                if not bool(agree):
                    raise ValueError(mismatch_message(world))
            else:
                torch._assert_async(agree, mismatch_message(world))
            since_fired = torch.where(buffer[:count] > 0, 0, self.since_fired + step_tokens)
            return TokensSinceFired(since_fired, self.tokens + step_tokens)

    def dead(self, *, threshold: int) -> Bool[Tensor, " latent"]:
        """The latents that have not fired for more than ``threshold`` tokens.

        sparsify's ``num_tokens_since_fired > dead_feature_threshold`` (10M by default);
        dictionary_learning compares with ``>=``, which is ``dead(threshold=t - 1)``.

        Raises:
            ValueError: ``threshold`` is not a non-negative Python int.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ValueError(f"`threshold` must be a non-negative Python int, got {threshold!r}.")
        return self.since_fired > threshold

    def state_dict(self) -> dict[str, Tensor]:
        """The state as plain tensors, loadable with ``torch.load(weights_only=True)``."""
        return {"since_fired": self.since_fired, "tokens": self.tokens}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "TokensSinceFired":
        """Rebuild a tracker from :meth:`state_dict`'s output.

        Raises:
            ValueError: the keys are not ``since_fired`` and ``tokens``.
            TypeError: a value is not an int64 tensor of its number of dimensions.
        """
        if set(state) != {"since_fired", "tokens"}:
            raise ValueError(
                f"a TokensSinceFired state has the keys 'since_fired' and 'tokens', "
                f"got {sorted(state)}."
            )
        return cls(state["since_fired"], state["tokens"])


pytree.register_pytree_node(
    TokensSinceFired,
    lambda tracker: ([tracker.since_fired, tracker.tokens], None),
    lambda children, _: TokensSinceFired(*children),
    serialized_type_name="sae_losses.TokensSinceFired",
)
