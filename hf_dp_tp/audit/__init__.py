"""Empirical privacy audit of a DPTrainer configuration from one training run (Steinke, Nasr &
Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023).

- :mod:`~hf_dp_tp.audit.statistics`: the ε lower bound from m canaries, r guesses and v correct;
- :mod:`~hf_dp_tp.audit.canaries`: canary inclusion, the canary dataset and collator, gradient
  canary directions, input canaries;
- :mod:`~hf_dp_tp.audit.trainer`: ``AuditTrainer`` (a DPTrainer with canaries and scores);
- :mod:`~hf_dp_tp.audit.run`: ``AuditConfig``, ``run_audit`` and the ``python -m hf_dp_tp.audit``
  command; :mod:`~hf_dp_tp.audit.report`: the JSON report and the plot.

What the bound does and does not prove: docs/audit.md.
"""

from importlib import import_module

_EXPORTS = {
    "AuditBound": "statistics",
    "AuditConfig": "run",
    "AuditTrainer": "trainer",
    "best_bound_over_guess_counts": "statistics",
    "epsilon_lower_bound": "statistics",
    "p_value": "statistics",
    "run_audit": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
