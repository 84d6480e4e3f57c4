"""The privacy section of a model card: what a saved or pushed DP model can claim, and what not.

:func:`write_privacy_card` adds (or replaces) one section, ``## Differential privacy``, in the
``README.md`` of a saved model or LoRA adapter (Trainer's card, peft's template, or a new file):
the (ε, δ) guarantee and the accountant that proves it, σ, q, the number of steps, C, the expected
batch, the privacy unit, and what the guarantee does not cover. Everything in it is a setting or
an accountant output — never a realised batch size, a seed or a key — so it may be published.
"""

from __future__ import annotations

import os
from typing import Any

CARD_NAME = "README.md"
SECTION_TITLE = "## Differential privacy"
_START = "<!-- hf_dp_tp:privacy:start -->"
_END = "<!-- hf_dp_tp:privacy:end -->"

#: The unit the (ε, δ) guarantee protects.
PRIVACY_UNIT = (
    "one record: one row of the training dataset (one example, one conversation). A person with "
    "several records is protected with group privacy only (ε grows with the number of records)."
)


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def privacy_section(report: dict[str, Any]) -> str:
    """The markdown section for a privacy report (:meth:`hf_dp_tp.DPTrainer.privacy_report`)."""
    upper = report.get("epsilon_is_upper_bound", True)
    claim = (
        f"({_number(report.get('epsilon'))}, {_number(report.get('delta'))})-differential privacy"
    )
    if not upper:
        claim += (
            " — **approximate**: the accountant may under-report ε; do not state it as a guarantee"
        )
    rows = [
        ("ε (spent)", _number(report.get("epsilon"))),
        ("δ", _number(report.get("delta"))),
        ("accountant", f"{report.get('accountant')} ({report.get('accountant_kind', '')})"),
        ("noise multiplier σ", _number(report.get("noise_multiplier"))),
        ("sampling", "Poisson, rate q = " + _number(report.get("sample_rate"))),
        ("optimizer steps", _number(report.get("steps"))),
        ("per-sample clip norm C", _number(report.get("per_sample_max_grad_norm"))),
        ("expected batch B̄ = q·N", _number(report.get("expected_batch_size"))),
        ("training records N", _number(report.get("dataset_size"))),
        ("secure mode (OS-CSPRNG noise)", _number(report.get("secure_mode"))),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    not_covered = "\n".join(f"- {item}" for item in report.get("not_covered", []))
    return (
        f"{_START}\n{SECTION_TITLE}\n\n"
        f"Fine-tuned with DP-SGD (`hf_dp_tp`): {claim} for the training data, with respect to "
        "adding or removing one record.\n\n"
        "| | |\n| --- | --- |\n"
        f"{table}\n\n"
        f"**Privacy unit:** {PRIVACY_UNIT}\n\n"
        "**Not covered by the guarantee:**\n\n"
        f"{not_covered}\n"
        "- the pretrained weights and any data used before this fine-tuning\n"
        f"{_END}\n"
    )


def write_privacy_card(directory: str, report: dict[str, Any]) -> str:
    """Add the privacy section to ``directory/README.md`` (replacing an earlier one), creating the
    file if there is none. Returns its path."""
    path = os.path.join(directory, CARD_NAME)
    section = privacy_section(report)
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if _START in text and _END in text:
        head, rest = text.split(_START, 1)
        tail = rest.split(_END, 1)[1].lstrip("\n")
        text = head + section + tail
    elif text:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        text = "---\ntags:\n- differential-privacy\n- hf_dp_tp\n---\n\n" + section
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
