"""The privacy plan of a run: batch arithmetic, σ, the accountant, the budget and the ledger.

One object answers every question the trainer and the engine ask about privacy, with one
formula each:

- ``B̄`` (expected global logical batch) and ``q = B̄ / N`` (the Poisson rate, global);
- steps per epoch ``max(1, round(1 / q))`` and planned steps ``max_steps`` or
  ``ceil(epochs × steps_per_epoch)``;
- δ: the user's, or by default ``min(1e-5, 1 / (10 N))`` — well below ``1/N``, where a mechanism
  that publishes one random record outright would still be "(0, 1/N)-DP";
- σ: given, or calibrated for ``target_epsilon`` over the planned steps;
- the accountant (one step per optimizer step with ``(σ, q)``), ε spent, and the **budget**:
  the largest total step count whose ε stays within the *current* ``target_epsilon``;
- the **ledger** written into every checkpoint (accountant history, σ, q, step counts — never a
  seed, a key or a generator state) and its validation on resume.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .accounting import (
    accountant_kind,
    calibrate_noise_multiplier,
    epsilon_is_upper_bound,
    epsilon_spent,
    make_accountant,
)
from .checkpoint import LEDGER_NAME, checkpoint_global_step, rank_optimizer_files

LEDGER_VERSION = 2
_LEDGER_KEYS = ("version", "accountant", "noise_multiplier", "sample_rate", "global_step")


def default_delta(dataset_size: int) -> float:
    """``min(1e-5, 1 / (10 N))``: δ must be well below ``1/N`` to mean anything."""
    return min(1e-5, 1.0 / (10 * dataset_size))


def steps_per_epoch(sample_rate: float) -> int:
    """Logical batches (optimizer steps) per epoch: ``max(1, round(1 / q))``."""
    return max(1, round(1.0 / sample_rate))


def planned_steps(sample_rate: float, *, max_steps: int = -1, epochs: float = 1.0) -> int:
    """``max_steps`` when positive, else ``max(1, ceil(epochs × steps_per_epoch))``."""
    if max_steps > 0:
        return int(max_steps)
    return max(1, math.ceil(epochs * steps_per_epoch(sample_rate)))


def check_dataset_size(dataset: Any) -> int:
    """``len(dataset)`` for a non-empty map-style dataset; a clear error otherwise."""
    from torch.utils.data import IterableDataset

    if dataset is None:
        raise ValueError("DP training requires a train_dataset.")
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError(
            "DP training needs a map-style train dataset with a length: Poisson sampling draws "
            f"each of the N records independently, and a {type(dataset).__name__} cannot be "
            "sampled that way. Materialise it (e.g. datasets.Dataset.from_generator) first."
        )
    size = len(dataset)
    if size == 0:
        raise ValueError("the train dataset is empty: DP training needs at least one record.")
    return size


class LedgerError(ValueError):
    """A privacy ledger that is missing, unreadable or inconsistent with its checkpoint."""


@dataclass
class PrivacyPlan:
    """Everything about a run's privacy that is not a tensor.

    Args:
        dataset_size: N, records in the training set (the privacy unit is one record).
        expected_batch_size: B̄, the expected *global* logical batch (all DP ranks together).
        accountant_name: ``"prv"``, ``"rdp"`` or ``"gdp"`` (approximate: refused unless
            ``allow_approximate_accountant``).
        noise_multiplier: σ, or None to calibrate it for ``target_epsilon``.
        target_epsilon: the budget (None: no budget stop; then σ must be given).
        target_delta: δ, or None for :func:`default_delta`.
        accountant: an existing opacus accountant to keep stepping (default: a new one).
        allow_approximate_accountant: accept an accountant whose ε may be under-reported
            (``"gdp"``); its ε is then marked approximate in the ledger and the report.
    """

    dataset_size: int
    expected_batch_size: float
    accountant_name: str = "prv"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    target_delta: float | None = None
    calibrated_steps: int | None = None
    accountant: Any = field(default=None, repr=False)
    allow_approximate_accountant: bool = False

    def __post_init__(self) -> None:
        if self.dataset_size <= 0:
            raise ValueError("the train dataset is empty: DP training needs at least one record.")
        if not self.expected_batch_size > 0:
            raise ValueError(f"the expected batch must be > 0, got {self.expected_batch_size}")
        if self.expected_batch_size > self.dataset_size:
            raise ValueError(
                f"the expected logical batch {self.expected_batch_size:g} exceeds the "
                f"{self.dataset_size} training records: lower the batch settings "
                "(per-device batch × gradient accumulation × dp size)."
            )
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("give a noise_multiplier or a target_epsilon")
        if self.target_delta is None:
            self.target_delta = default_delta(self.dataset_size)
        if self.accountant is None:
            self.accountant = self._new_accountant()

    def _new_accountant(self):
        return make_accountant(
            self.accountant_name, allow_approximate_accountant=self.allow_approximate_accountant
        )

    @property
    def epsilon_is_upper_bound(self) -> bool:
        """False for an approximate accountant (``"gdp"``): its ε may be below the true loss."""
        return epsilon_is_upper_bound(self.accountant_name)

    # ------------------------------------------------------------------ batch arithmetic
    @property
    def sample_rate(self) -> float:
        """q = B̄ / N, the global Poisson rate."""
        return self.expected_batch_size / self.dataset_size

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.sample_rate)

    def planned_steps(self, *, max_steps: int = -1, epochs: float = 1.0) -> int:
        return planned_steps(self.sample_rate, max_steps=max_steps, epochs=epochs)

    # ------------------------------------------------------------------ σ and ε
    def resolve_noise_multiplier(self, steps: int) -> float:
        """σ: the given one, or calibrated once so that ``steps`` steps spend ``target_epsilon``."""
        if self.noise_multiplier is None:
            self.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=self.target_epsilon,
                target_delta=self.target_delta,
                sample_rate=self.sample_rate,
                steps=steps,
                accountant=self.accountant_name,
                allow_approximate_accountant=self.allow_approximate_accountant,
            )
            self.calibrated_steps = steps
        return self.noise_multiplier

    def step(self, noise_multiplier: float | None = None) -> None:
        """One optimizer step with ``(σ, q)`` (σ: the noise actually used, default the plan's)."""
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        self.accountant.step(noise_multiplier=sigma, sample_rate=self.sample_rate)

    @property
    def steps_accounted(self) -> int:
        return sum(int(steps) for _, _, steps in self.accountant.history)

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the plan's δ)."""
        return epsilon_spent(self.accountant, self.target_delta if delta is None else delta)

    def epsilon_after(self, total_steps: int) -> float:
        """ε after ``total_steps`` optimizer steps in all: the history, then ``(σ, q)`` steps."""
        probe = self._new_accountant()
        probe.history = list(self.accountant.history)
        extra = total_steps - self.steps_accounted
        if extra > 0:
            probe.history.append((self.noise_multiplier, self.sample_rate, extra))
        return epsilon_spent(probe, self.target_delta)

    def budget_steps(self, horizon: int) -> int | None:
        """The largest total step count ``≤ horizon`` whose ε is within ``target_epsilon``
        (None without a target). Checked against the *current* target, whatever σ was
        calibrated for.

        Raises:
            ValueError: if the ε already spent exceeds the target.
        """
        target = self.target_epsilon
        if target is None:
            return None
        done = self.steps_accounted
        spent = self.epsilon()
        if spent > target:
            raise ValueError(
                f"the ε already spent ({spent:.4g} at δ={self.target_delta:g}, {done} steps) "
                f"exceeds target_epsilon={target}: this run cannot continue within that budget. "
                "Keep the target the checkpoint was trained with, or stop here."
            )
        if horizon <= done or self.epsilon_after(horizon) <= target:
            return max(horizon, done)
        low, high = done, horizon  # ε(low) <= target < ε(high)
        while high - low > 1:
            mid = (low + high) // 2
            if self.epsilon_after(mid) <= target:
                low = mid
            else:
                high = mid
        return low

    # ------------------------------------------------------------------ the ledger
    def ledger(
        self,
        *,
        global_step: int,
        optimizer_state: dict[str, Any] | None,
        layout: dict[str, int] | None = None,
    ) -> dict:
        """The privacy ledger: enough to continue ε exactly, nothing to regenerate noise or
        batches (no seed, key or generator state). ``layout`` is the parallel layout of the run
        that wrote it (:func:`check_layout` compares it on resume); the accountant entry says
        whether its ε is a proven upper bound."""
        return {
            "version": LEDGER_VERSION,
            "accountant": {
                "mechanism": self.accountant_name,
                "history": [list(entry) for entry in self.accountant.history],
                "epsilon_is_upper_bound": self.epsilon_is_upper_bound,
                "accountant_kind": accountant_kind(self.accountant_name),
            },
            "layout": layout,
            "noise_multiplier": self.noise_multiplier,
            "calibrated_steps": self.calibrated_steps,
            "target_epsilon": self.target_epsilon,
            "target_delta": self.target_delta,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.expected_batch_size,
            "dataset_size": self.dataset_size,
            "optimizer": optimizer_state,
            "global_step": global_step,
        }

    def restore(self, ledger: dict[str, Any], *, where: str, explicit_sigma: bool) -> None:
        """Continue from ``ledger`` (already read and checked by :func:`read_ledger`).

        The accountant history and σ come from the ledger. A σ given explicitly for this run
        must equal the ledger's (a different σ would silently not be used); the sampling rate and
        the accountant must match.
        """
        if ledger["accountant"]["mechanism"] != self.accountant_name:
            raise LedgerError(
                f"{where}: the checkpoint was accounted with "
                f"{ledger['accountant']['mechanism']!r}, not {self.accountant_name!r}; resume with "
                "the same accountant."
            )
        if abs(ledger["sample_rate"] - self.sample_rate) > 1e-12:
            raise LedgerError(
                f"{where}: the checkpoint's sampling rate {ledger['sample_rate']} differs from this "
                f"run's {self.sample_rate}: keep the dataset and batch settings when resuming."
            )
        saved_sigma = ledger["noise_multiplier"]
        if explicit_sigma and self.noise_multiplier != saved_sigma:
            raise LedgerError(
                f"{where}: noise_multiplier={self.noise_multiplier} but the checkpoint was trained "
                f"with σ={saved_sigma}. Resume with the checkpoint's σ (or leave noise_multiplier "
                "unset and give target_epsilon to keep it)."
            )
        self.noise_multiplier = saved_sigma
        self.calibrated_steps = ledger.get("calibrated_steps")
        self.accountant.history = [tuple(entry) for entry in ledger["accountant"]["history"]]

    def report(self) -> dict[str, Any]:
        """ε, δ, σ, q, steps and the accountant; ``epsilon_is_upper_bound`` is False (and
        ``accountant_kind`` says "approximate (may under-report)") for an approximate accountant."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.target_delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps_accounted,
            "accountant": self.accountant_name,
            "epsilon_is_upper_bound": self.epsilon_is_upper_bound,
            "accountant_kind": accountant_kind(self.accountant_name),
            "expected_batch_size": self.expected_batch_size,
            "dataset_size": self.dataset_size,
            "poisson_sampling": True,
            "target_epsilon": self.target_epsilon,
        }


#: The keys of a parallel layout (:func:`check_layout`), in the order they are described.
LAYOUT_KEYS = ("world_size", "dp_size", "tp_size", "dp_shard_size", "dp_replicate_size")


def describe_layout(layout: dict[str, Any]) -> str:
    """``world_size=2 (dp=1 × tp=2, dp_shard=1, dp_replicate=1)``."""
    return (
        f"world_size={layout.get('world_size')} (dp={layout.get('dp_size')} × "
        f"tp={layout.get('tp_size')}, dp_shard={layout.get('dp_shard_size')}, "
        f"dp_replicate={layout.get('dp_replicate_size')})"
    )


def check_layout(
    ledger: dict[str, Any],
    layout: dict[str, int],
    *,
    where: str,
    rank_specific_state: bool,
) -> None:
    """Refuse to resume ``ledger``'s checkpoint (``where``) on another parallel layout.

    Per-rank optimizer state (TP shards, FSDP shards) belongs to one layout: loaded on another it
    crashes at the first optimizer step, after that step's noise and accountant stages ran, or
    silently pairs state with the wrong shards. (FSDP's model shards could be resharded by
    ``torch.distributed.checkpoint``; the optimizer state cannot.) So any change of world size,
    ``tp_size``, ``dp_shard`` or ``dp_replicate`` is refused, naming both layouts.

    A ledger written before the layout was recorded (no ``"layout"`` key) is accepted only when
    the layout cannot matter: the checkpoint holds no per-rank optimizer files
    (``optimizer.rank*.pt``) and this run keeps none (``rank_specific_state`` False: pure data
    parallelism, every rank holds the whole optimizer state). Otherwise it is refused.
    """
    saved = ledger.get("layout")
    current = {key: int(layout[key]) for key in LAYOUT_KEYS}
    if saved is None:
        files = rank_optimizer_files(where)
        if files == 0 and not rank_specific_state:
            return
        raise LedgerError(
            f"{where}: its privacy ledger does not record the parallel layout that wrote it (a "
            f"ledger from an older hf_dp_tp) and the checkpoint holds {files} per-rank optimizer "
            f"files while this run is {describe_layout(current)}: per-rank optimizer state can "
            "only be resumed on the layout that wrote it, which cannot be checked here. Resume "
            "with the hf_dp_tp version and layout that wrote the checkpoint."
        )
    try:
        saved_layout = {key: int(saved[key]) for key in LAYOUT_KEYS}
    except (TypeError, ValueError, KeyError) as err:
        raise LedgerError(f"{where}: the ledger's layout {saved!r} is malformed ({err}).") from None
    if saved_layout != current:
        raise LedgerError(
            f"{where}: the checkpoint was written by {describe_layout(saved_layout)} but this run "
            f"is {describe_layout(current)}. Per-rank optimizer state cannot be resharded: "
            "resume with the same number of processes, tp_size and FSDP/HSDP sizes (dp_shard, "
            "dp_replicate) as the run that wrote it."
        )


def read_ledger(checkpoint_dir: str) -> dict[str, Any]:
    """Read a checkpoint's ledger and check that it belongs to that checkpoint.

    Refused, with the file named: a missing, truncated or malformed file; a ledger whose
    ``global_step`` differs from the checkpoint's (its ``trainer_state.json``); an accountant
    history or optimizer step count that disagrees with ``global_step``.
    """
    path = os.path.join(checkpoint_dir, LEDGER_NAME)
    if not os.path.isfile(path):
        raise LedgerError(
            f"{os.path.dirname(path) or '.'} has no privacy ledger ({os.path.basename(path)}): "
            "resuming DP training from it would reset ε. Resume only from DPTrainer checkpoints."
        )
    try:
        with open(path) as f:
            ledger = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LedgerError(f"privacy ledger {path} is unreadable or corrupt ({err}).") from None
    if not isinstance(ledger, dict) or any(key not in ledger for key in _LEDGER_KEYS):
        raise LedgerError(
            f"privacy ledger {path} is incomplete: expected the keys {list(_LEDGER_KEYS)}."
        )
    if ledger["version"] != LEDGER_VERSION:
        raise LedgerError(
            f"privacy ledger {path} has version {ledger['version']!r}; this hf_dp_tp reads "
            f"version {LEDGER_VERSION}."
        )
    try:
        accounted = sum(int(steps) for _, _, steps in ledger["accountant"]["history"])
        global_step = int(ledger["global_step"])
        optimizer_steps = (ledger.get("optimizer") or {}).get("steps_taken", accounted)
    except (TypeError, ValueError, KeyError) as err:
        raise LedgerError(f"privacy ledger {path} is malformed ({err}).") from None
    checkpoint_step = checkpoint_global_step(checkpoint_dir)
    if global_step != checkpoint_step:
        raise LedgerError(
            f"privacy ledger {path} records step {global_step} but its checkpoint is at step "
            f"{checkpoint_step}: the ledger does not belong to this checkpoint (ε would be "
            "under-reported). Resume from an untouched DPTrainer checkpoint."
        )
    if not accounted == optimizer_steps == global_step:
        raise LedgerError(
            f"privacy ledger {path} is inconsistent: {accounted} accounted steps, "
            f"{optimizer_steps} noisy optimizer steps, global step {global_step}."
        )
    return ledger
