"""Privacy accounting on top of opacus's accountants (contract rule 10, docs/usage.md).

One accountant step per optimizer step with the *global* sampling rate q and σ; every rank keeps
an identical accountant, rank 0 reports.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

ACCOUNTANTS = ("prv", "rdp", "gdp")


def make_accountant(name: str) -> IAccountant:
    """``"prv"`` (tight, default), ``"rdp"`` (conservative) or ``"gdp"`` (a CLT approximation that
    can understate ε; allowed with a warning)."""
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose one of {ACCOUNTANTS}.")
    if name == "gdp":
        warnings.warn(
            "the 'gdp' accountant is a central-limit approximation that can understate epsilon "
            "for few steps or large sampling rates; prefer 'prv' for a reportable guarantee.",
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
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
) -> float:
    """The smallest σ (to opacus's tolerance) giving ``target_epsilon`` at ``target_delta`` after
    ``steps`` steps at sampling rate ``sample_rate``."""
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
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except (ValueError, RuntimeError, OverflowError) as err:
        raise ValueError(
            f"target_epsilon={target_epsilon} at delta={target_delta} is unreachable with sampling "
            f"rate {sample_rate:.3g} over {steps} steps ({err}). Raise target_epsilon or "
            "target_delta, train fewer steps, or use a smaller batch."
        ) from err
