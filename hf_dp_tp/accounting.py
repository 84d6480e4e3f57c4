"""Privacy accounting on top of opacus's accountants (contract rule 10, docs/usage.md).

One accountant step per optimizer step with the *global* sampling rate q and σ; every rank keeps
an identical accountant, rank 0 reports.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

ACCOUNTANTS = ("prv", "rdp", "gdp")
#: Accountants whose ε is an approximation, not a proven upper bound: "gdp" (a central-limit
#: approximation) reports less than a proven lower bound on ε in many settings (docs/usage.md,
#: "Privacy accounting"). They must be acknowledged with ``allow_approximate_accountant=True``.
APPROXIMATE_ACCOUNTANTS = ("gdp",)

# RDP orders for the "rdp" accountant: opacus's default grid stops at 63, where the optimum
# sits for small σ or many steps (opacus then warns that a wider grid would give a tighter ε);
# every order gives a valid bound, so more orders can only tighten the reported ε.
RDP_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 64),
    *(64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024, 2048, 4096),
)

_LARGEST_ALPHA = "Optimal order is the largest alpha"


@contextlib.contextmanager
def _quiet_prv(mechanism: str, sample_rates: Iterable[float]) -> Iterator[None]:
    """Silence two harmless opacus PRV warnings, for PRV calls only.

    - "Optimal order is the largest alpha": PRV sizes its truncation domain [-L, L] from an RDP
      bound over RDP's default orders (``compute_safe_domain_size``). That bound only sets L; any
      order gives a valid upper bound, so a non-optimal one makes L larger — a wider domain, a
      smaller truncation error — and the ε PRV reports stays an upper bound. (The "rdp"
      accountant gets a wider grid instead, ``RDP_ORDERS``, so its warning keeps its meaning.)
    - numpy's "divide by zero encountered in log" at q = 1 (no subsampling, as in the audit):
      the PRV's CDF compares t with log(1 - q) = log 0 = -inf, which every t passes — the right
      limit (the plain Gaussian mechanism); only that log is affected.
    """
    if mechanism != "prv":
        yield
        return
    full_batch = any(q == 1 for q in sample_rates)
    with warnings.catch_warnings(), np.errstate(divide="ignore" if full_batch else "warn"):
        warnings.filterwarnings(
            "ignore",
            message=_LARGEST_ALPHA,
            category=UserWarning,
            module=r"opacus\.accountants\.analysis\.rdp",
        )
        yield


def _epsilon_kwargs(mechanism: str) -> dict[str, Any]:
    return {"alphas": list(RDP_ORDERS)} if mechanism == "rdp" else {}


def epsilon_is_upper_bound(name: str) -> bool:
    """Whether the accountant ``name`` reports a proven upper bound on ε (``"prv"``, ``"rdp"``)
    rather than an approximation that may under-report it (``"gdp"``)."""
    return name not in APPROXIMATE_ACCOUNTANTS


def accountant_kind(name: str) -> str:
    """``"upper bound"`` or ``"approximate (may under-report)"``: how to read ``name``'s ε."""
    return "upper bound" if epsilon_is_upper_bound(name) else "approximate (may under-report)"


def check_accountant(name: str, *, allow_approximate_accountant: bool = False) -> None:
    """Refuse an unknown accountant, and an approximate one (``"gdp"``) unless the caller
    acknowledged with ``allow_approximate_accountant=True`` that its ε may be under-reported."""
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose one of {ACCOUNTANTS}.")
    if not epsilon_is_upper_bound(name) and not allow_approximate_accountant:
        raise ValueError(
            f"accountant={name!r} is a central-limit approximation whose epsilon can be BELOW the "
            "true privacy loss (it under-reports ε for few steps or large sampling rates), so it "
            "cannot back a stated (ε, δ) guarantee. Use 'prv' (default) or 'rdp'; to use it "
            "anyway, for comparison only, also set allow_approximate_accountant=True (its ε is "
            "then marked approximate in the logs, the ledger and the privacy report)."
        )


def make_accountant(name: str, *, allow_approximate_accountant: bool = False) -> IAccountant:
    """``"prv"`` (tight, default), ``"rdp"`` (conservative) or ``"gdp"`` (a CLT approximation
    that can understate ε: refused unless ``allow_approximate_accountant=True``, then warned
    about)."""
    from opacus.accountants import create_accountant

    check_accountant(name, allow_approximate_accountant=allow_approximate_accountant)
    if not epsilon_is_upper_bound(name):
        warnings.warn(
            f"the {name!r} accountant is a central-limit approximation that can understate "
            "epsilon for few steps or large sampling rates: its ε is not a guarantee; use 'prv' "
            "for a reportable one.",
            stacklevel=2,
        )
    return create_accountant(mechanism=name)


def epsilon_spent(accountant: IAccountant, delta: float) -> float:
    """ε at ``delta`` for the accountant's history: 0 before any step, ∞ if any step had σ = 0."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if len(accountant.history) == 0:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in accountant.history):
        return math.inf
    mechanism = accountant.mechanism()
    with _quiet_prv(mechanism, (q for _, q, _ in accountant.history)):
        return float(accountant.get_epsilon(delta=delta, **_epsilon_kwargs(mechanism)))


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    allow_approximate_accountant: bool = False,
) -> float:
    """The smallest σ (to opacus's tolerance) giving ``target_epsilon`` at ``target_delta`` after
    ``steps`` steps at sampling rate ``sample_rate`` (an approximate ``accountant`` is refused
    unless ``allow_approximate_accountant=True``, see :func:`check_accountant`)."""
    check_accountant(accountant, allow_approximate_accountant=allow_approximate_accountant)
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon}")
    if not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"the number of steps must be >= 1, got {steps}")
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with _quiet_prv(accountant, (sample_rate,)):
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=target_delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    **_epsilon_kwargs(accountant),
                )
            )
    except (ValueError, RuntimeError, OverflowError) as err:
        raise ValueError(
            f"target_epsilon={target_epsilon} at delta={target_delta} is unreachable with sampling "
            f"rate {sample_rate:.3g} over {steps} steps ({err}). Raise target_epsilon or "
            "target_delta, train fewer steps, or use a smaller batch."
        ) from err
