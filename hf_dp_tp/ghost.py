"""Per-sample gradients kept as factors: ghost norms and book-keeping clipped sums.

The per-sample gradient of a matrix weight is a sum over the tokens of the sample of outer
products, ``G_i = Σ_t l_i[t] ⊗ r_i[t]`` (an :class:`OuterProducts`):

- ``nn.Linear`` ``W[out, in]``: ``l`` = output gradient, ``r`` = input activation;
- GPT-2 ``Conv1D`` ``W[in, out]``: ``l`` = input activation, ``r`` = output gradient;
- ``nn.Embedding`` ``E[V, d]``: ``l`` = the one-hot row of each token id (kept as ids), ``r`` =
  output gradient.

On a TP rank every factor is the *local* one (the rank's rows, columns or vocabulary range), so
``G_i`` is this rank's slice of the per-sample gradient and its squared norm is summed over the TP
group like any sharded one (contract rule 3, docs/usage.md).

Nothing of size ``B × parameters`` is kept unless it is the smaller form: a layer whose
materialised per-sample gradient (``m·n`` per sample) is smaller than its factors (``T(m + n)``)
is materialised as soon as its output gradient arrives (:func:`keeps_factors`; e.g. long
sequences on small layers, LoRA adapters), like the per-sample mode. For the factored terms of one
parameter (several when the parameter is used more than once in a forward pass, e.g. an embedding
tied to the LM head):

- squared norm ``‖Σ_k G_k‖² = Σ_{k,l} Σ_{t,s} (l_k[t]·l_l[s]) (r_k[t]·r_l[s])`` — the "ghost"
  form, ``O(T²(m + n))`` per sample, cross terms between the uses included — or, when
  ``T·m·n < T²(m + n)``, by materialising ``Σ_k G_k`` one parameter at a time;
- clipped sum ``Σ_i c_i G_i = Σ_{i,t} (c_i l_i[t]) ⊗ r_i[t]``: one contraction over the batch and
  tokens ("book-keeping": no second backward pass), or an ``index_add`` of rows for embeddings.

Other layers (biases, norms, rules without factors) give a materialised per-sample gradient
``[B, *local_shape]``: they are small. :class:`FactoredGradSample` holds one parameter's terms
over the forward passes not yet clipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .norms import squared_norm_per_sample

__all__ = [
    "OuterProducts",
    "FactoredGradSample",
    "materialise_terms",
    "squared_norms_of",
    "clipped_sum_of",
    "sum_of",
]


def _acc(dtype: torch.dtype) -> torch.dtype:
    """At least fp32 (norms and sums are never accumulated in bf16/fp16)."""
    return torch.promote_types(dtype, torch.float32)


def batched_products(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` (batched) with the result and its sums in ``dtype``. On CUDA, half-precision
    inputs go straight to a GEMM with fp32 output: a product of two bf16/fp16 numbers is exact in
    fp32 and the sums are fp32, the same as casting the inputs first, without the casts and on
    tensor cores. Elsewhere the inputs are cast to ``dtype``."""
    half = (torch.bfloat16, torch.float16)
    if a.is_cuda and dtype == torch.float32 and a.dtype == b.dtype and a.dtype in half:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (NotImplementedError, RuntimeError, TypeError):
            pass
    return torch.bmm(a.to(dtype), b.to(dtype))


def tokens_view(t: torch.Tensor) -> torch.Tensor:
    """``[B, features]`` → ``[B, 1, features]``; ``[B, ..., features]`` → ``[B, T, features]``
    (every dim between the batch and the features is a token dim). Works for ``B = 0``."""
    return t.unsqueeze(1) if t.ndim == 2 else t.flatten(1, -2)


@dataclass
class OuterProducts:
    """``G_i = Σ_t left[i, t] ⊗ right[i, t]``, a per-sample gradient of shape ``[rows, cols]``.

    ``left`` is ``[B, T, rows]``, or ``[B, T]`` integer row indices (one-hot rows; ``-1`` for a
    token that touches no row of this shard); ``right`` is ``[B, T, cols]``. ``dtype`` is the
    precision the materialised gradient is computed in (norms and sums use at least fp32).
    """

    left: torch.Tensor
    right: torch.Tensor
    rows: int
    dtype: torch.dtype

    @property
    def is_index(self) -> bool:
        return not self.left.is_floating_point()

    @property
    def batch_size(self) -> int:
        return self.right.shape[0]

    @property
    def tokens(self) -> int:
        return self.right.shape[1]

    @property
    def cols(self) -> int:
        return self.right.shape[2]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def materialise(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The per-sample gradients ``[B, rows, cols]``."""
        dtype = dtype or self.dtype
        batch = self.batch_size
        if self.is_index:
            right = self.right.to(dtype)
            keep = self.left >= 0
            flat = (torch.arange(batch, device=right.device).unsqueeze(1) * self.rows + self.left)[
                keep
            ]
            out = torch.zeros(batch * self.rows, self.cols, dtype=dtype, device=right.device)
            out.index_add_(0, flat, right[keep])
            return out.view(batch, self.rows, self.cols)
        return batched_products(self.left.transpose(1, 2), self.right, dtype)

    def weighted_sum(
        self, weights: torch.Tensor, excluded: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``Σ_i w_i G_i`` ``[rows, cols]`` in at least fp32: one contraction over batch and
        tokens (an ``index_add`` of rows for one-hot ``left``). ``excluded`` (bool ``[B]``):
        samples whose factors are zeroed first, so that they add exactly zero even when they hold
        NaN or inf (``0 · NaN`` would be NaN)."""
        dtype = _acc(self.dtype)
        w = weights.to(dtype).view(-1, 1, 1)
        right = _zero_rows(self.right.to(dtype), excluded) * w
        if self.is_index:
            keep = self.left >= 0
            out = torch.zeros(self.rows, self.cols, dtype=dtype, device=right.device)
            out.index_add_(0, self.left[keep], right[keep])
            return out
        left = _zero_rows(self.left.to(dtype), excluded)
        return left.flatten(0, 1).t() @ right.flatten(0, 1)

    def token_gram(self, other: OuterProducts, side: str, dtype: torch.dtype) -> torch.Tensor:
        """``[B, T_self, T_other]`` of ``x_self[t] · x_other[s]`` for ``side`` ``"left"`` or
        ``"right"`` (one-hot rows compare ids; a one-hot row against a dense one gathers)."""
        if side == "right":
            return batched_products(self.right, other.right.transpose(1, 2), dtype)
        if self.is_index and other.is_index:
            a, b = self.left.unsqueeze(2), other.left.unsqueeze(1)
            return ((a == b) & (a >= 0)).to(dtype)
        if self.is_index:  # gram[t, s] = other.left[s, id[t]]
            ids = self.left.clamp_min(0).unsqueeze(1).expand(-1, other.tokens, -1)
            gathered = torch.gather(other.left.to(dtype), 2, ids)  # [B, T_other, T_self]
            return gathered.transpose(1, 2) * (self.left >= 0).unsqueeze(2).to(dtype)
        if other.is_index:
            return other.token_gram(self, "left", dtype).transpose(1, 2)
        return batched_products(self.left, other.left.transpose(1, 2), dtype)

    def inner(self, other: OuterProducts) -> torch.Tensor:
        """``⟨G_i, G'_i⟩`` per sample ``[B]``, in at least fp32, without building ``G``."""
        dtype = _acc(torch.promote_types(self.dtype, other.dtype))
        left = self.token_gram(other, "left", dtype)
        right = self.token_gram(other, "right", dtype)
        return (left * right).sum((1, 2))

    def materialise_cost(self) -> int:
        """Rough per-sample cost of building ``G`` (zeroing + products)."""
        per_token = self.cols if self.is_index else self.rows * self.cols
        return self.rows * self.cols + self.tokens * per_token


Term = torch.Tensor | OuterProducts


def _ghost_cost(terms: list[OuterProducts]) -> int:
    cost = 0
    for a in terms:
        for b in terms:
            left = 0 if (a.is_index and b.is_index) else (1 if a.is_index or b.is_index else a.rows)
            cost += a.tokens * b.tokens * (a.cols + left)
    return cost


NORM_FORMS = ("auto", "ghost", "materialise")
_norm_form = "auto"


@contextmanager
def norm_form(form: str) -> Iterator[None]:
    """Compute squared norms of factored terms in one form for every layer (``"ghost"``: token
    Grams; ``"materialise"``: build ``G``), instead of the cheaper one per layer (``"auto"``).
    Both are exact; this is for tests and benchmarks."""
    global _norm_form
    if form not in NORM_FORMS:
        raise ValueError(f"form must be one of {NORM_FORMS}, got {form!r}")
    previous, _norm_form = _norm_form, form
    try:
        yield
    finally:
        _norm_form = previous


def prefers_ghost(terms: list[OuterProducts]) -> bool:
    """Whether the token-Gram form is cheaper than materialising, for these terms of one
    parameter: ``Σ_{k,l} T_k T_l (n + m)`` against ``m n + Σ_k T_k m n`` (per sample), unless
    :func:`norm_form` forces one."""
    if _norm_form != "auto":
        return _norm_form == "ghost"
    materialise = terms[0].rows * terms[0].cols + sum(
        t.materialise_cost() - t.rows * t.cols for t in terms
    )
    return _ghost_cost(terms) < materialise


def keeps_factors(term: OuterProducts) -> bool:
    """Per-layer choice of what a call leaves until clipping: its factors (``T(m + n)`` values
    per sample) or its materialised gradient (``m n`` values per sample), whichever is smaller.
    A materialised gradient is also cheaper to clip (a weighted sum over the batch instead of a
    contraction over batch and tokens). :func:`norm_form` other than ``"auto"`` keeps factors
    (so that the forced form applies to every factored layer)."""
    if _norm_form != "auto":
        return True
    per_token = 1 + term.cols if term.is_index else term.rows + term.cols
    return term.tokens * per_token < term.rows * term.cols


def materialise_terms(terms: dict[str, Term]) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``{name: [B, ...]}`` from a rule's factored output."""
    return {k: v.materialise() if isinstance(v, OuterProducts) else v for k, v in terms.items()}


def _generation_squared_norms(terms: list[Term], shape: tuple[int, ...]) -> torch.Tensor:
    """``‖Σ_k G_k‖²`` per sample for the terms of one parameter in one forward pass."""
    outer = [t for t in terms if isinstance(t, OuterProducts)]
    if outer and len(outer) == len(terms) and prefers_ghost(outer):
        total = None
        for k, a in enumerate(outer):
            for b in outer[k:]:
                part = a.inner(b) if b is a else 2 * a.inner(b)
                total = part if total is None else total + part
        return total
    total = _materialised_sum(terms, shape, _acc(terms[0].dtype))
    return total.pow(2).flatten(1).sum(1)


def _materialised_sum(
    terms: list[Term], shape: tuple[int, ...], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``Σ_k G_k`` of one forward pass as ``[B, *shape]``, in ``dtype`` (else each term's own)."""
    total = None
    for t in terms:
        if isinstance(t, OuterProducts):
            g = t.materialise(dtype)
        else:
            g = t if dtype is None else t.to(dtype)
        g = g.reshape(g.shape[0], *shape)
        total = g if total is None else total + g
    return total


@dataclass
class FactoredGradSample:
    """One parameter's per-sample gradients over the forward passes not yet clipped, as terms.

    ``generations[j]`` holds the terms of forward pass ``j`` (several when the parameter is used
    more than once in it: their per-sample gradients add up, cross terms included in the norm);
    samples of later passes follow those of earlier ones, as with materialised gradients.
    ``shape`` is the local shape of the parameter.
    """

    shape: tuple[int, ...]
    generations: list[list[Term]] = field(default_factory=list)
    _ids: list[object] = field(default_factory=list)

    def add(self, term: Term, generation: int) -> None:
        if self._ids and self._ids[-1] == generation:
            if _batch(term) != _batch(self.generations[-1][0]):
                raise RuntimeError("one forward pass gave a parameter two different batch sizes")
            self.generations[-1].append(term)
        else:
            self._ids.append(generation)
            self.generations.append([term])

    def append_samples(self, grad_sample: torch.Tensor) -> None:
        """Add materialised per-sample gradients ``[b, *shape]`` as further samples (a pass of
        their own), e.g. an audit's gradient canaries."""
        self._ids.append(object())
        self.generations.append([grad_sample])

    @property
    def batch_sizes(self) -> list[int]:
        return [_batch(terms[0]) for terms in self.generations]

    @property
    def batch_size(self) -> int:
        return sum(self.batch_sizes)

    @property
    def dtype(self) -> torch.dtype:
        return self.generations[0][0].dtype

    def squared_norms(self) -> torch.Tensor:
        """``[B]`` squared norms of the local per-sample gradients, in at least fp32."""
        parts = [_generation_squared_norms(terms, self.shape) for terms in self.generations]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def clipped_sum(
        self, factors: torch.Tensor, excluded: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``Σ_i c_i g_i`` of the local shape, in at least fp32 (``factors`` is ``[B]``);
        samples flagged in ``excluded`` (bool ``[B]``) add exactly zero (:func:`clipped_sum_of`)."""
        dtype = _acc(self.dtype)
        sizes = self.batch_sizes
        masks = [None] * len(sizes) if excluded is None else excluded.split(sizes)
        total = None
        for c, mask, terms in zip(factors.split(sizes), masks, self.generations, strict=True):
            for t in terms:
                if isinstance(t, OuterProducts):
                    part = t.weighted_sum(c, mask).view(self.shape)
                else:
                    part = _weighted_rows(t, c, mask, dtype)
                total = part if total is None else total + part
        return total

    def sum(self) -> torch.Tensor:
        """``Σ_i g_i`` (what autograd accumulates for ``loss_reduction="sum"``)."""
        weights = torch.ones(self.batch_size, dtype=_acc(self.dtype), device=self._device())
        return self.clipped_sum(weights)

    def materialise(self) -> torch.Tensor:
        """``[B, *shape]`` per-sample gradients (for tests and debugging: the expensive form)."""
        parts = [_materialised_sum(terms, self.shape) for terms in self.generations]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _device(self) -> torch.device:
        t = self.generations[0][0]
        return t.right.device if isinstance(t, OuterProducts) else t.device


def _batch(t: Term) -> int:
    return t.batch_size if isinstance(t, OuterProducts) else t.shape[0]


GradSample = torch.Tensor | FactoredGradSample


def squared_norms_of(grad_sample: GradSample) -> torch.Tensor:
    """``[B]`` squared norms (at least fp32) of materialised or factored per-sample gradients."""
    if isinstance(grad_sample, FactoredGradSample):
        return grad_sample.squared_norms()
    return squared_norm_per_sample(grad_sample)


def _zero_rows(t: torch.Tensor, excluded: torch.Tensor | None) -> torch.Tensor:
    """``t`` ``[B, ...]`` with the rows flagged in ``excluded`` set to exactly zero (a select,
    not a product: NaN and inf rows become 0 too)."""
    if excluded is None:
        return t
    return torch.where(excluded.view(-1, *[1] * (t.ndim - 1)), t.new_zeros(()), t)


def _weighted_rows(
    t: torch.Tensor, weights: torch.Tensor, excluded: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``Σ_i w_i t_i`` in ``dtype``, the rows flagged in ``excluded`` left out exactly."""
    return torch.einsum("n,n...->...", weights.to(dtype), _zero_rows(t.to(dtype), excluded))


def clipped_sum_of(
    grad_sample: GradSample, factors: torch.Tensor, excluded: torch.Tensor | None = None
) -> torch.Tensor:
    """``Σ_i c_i g_i`` (at least fp32) of materialised or factored per-sample gradients.

    ``excluded`` (bool ``[B]``, optional): samples that must add exactly zero whatever they hold
    — a sample whose gradient is NaN or inf (contract, docs/usage.md: a non-finite per-sample
    gradient contributes nothing). Their rows are selected away before the contraction, since a
    zero factor alone would give ``0 · NaN = NaN``."""
    if isinstance(grad_sample, FactoredGradSample):
        return grad_sample.clipped_sum(factors, excluded)
    return _weighted_rows(grad_sample, factors, excluded, _acc(grad_sample.dtype))


def sum_of(grad_sample: GradSample) -> torch.Tensor:
    """``Σ_i g_i`` in at least fp32."""
    if isinstance(grad_sample, FactoredGradSample):
        return grad_sample.sum()
    return grad_sample.to(_acc(grad_sample.dtype)).sum(0)


def batch_size_of(grad_sample: GradSample) -> int:
    if isinstance(grad_sample, FactoredGradSample):
        return grad_sample.batch_size
    return grad_sample.shape[0]
