"""The audit report: the bound, the counts, the configuration, diagnostics, and the canary scores
(``audit_report.json``, ``canary_scores.csv`` and a plot of scores in vs out:
``canary_scores.png`` with matplotlib, else a text histogram ``canary_scores.txt``)."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import numpy as np

from .statistics import AuditBound, best_bound_over_guess_counts, guesses_from_scores

REPORT_NAME = "audit_report.json"
SCORES_NAME = "canary_scores.csv"

#: Stated in every report: what the number means.
MEANING = (
    "With the stated confidence, this training configuration is NOT (ε, δ)-DP for any ε below "
    "epsilon_lower_bound (Steinke, Nasr & Jagielski 2023, one-run audit). A lower bound above "
    "claimed_epsilon proves the implementation or the accounting wrong. A lower bound below it "
    "proves nothing about privacy: it is what these canaries and this attack could detect, not a "
    "certificate that the claim holds."
)


def score_diagnostics(
    scores: np.ndarray, included: np.ndarray, record: dict[str, Any]
) -> dict[str, Any]:
    """Means of the scores in and out; for gradient canaries also the noise seen in the scores of
    the excluded canaries against what σ implies (``σ·√T`` in units of one clipped canary):
    a ratio far from 1 means the noise actually added is not the noise accounted for (too little
    noise raises the bound; too much — e.g. noise added on every DP replica — does not, so it is
    flagged here)."""
    included = included.astype(bool)
    out = {
        "mean_score_in": float(scores[included].mean()) if included.any() else math.nan,
        "mean_score_out": float(scores[~included].mean()) if (~included).any() else math.nan,
        "std_score_out": float(scores[~included].std(ddof=1))
        if (~included).sum() > 1
        else math.nan,
    }
    if record.get("canary_kind") == "gradient":
        sigma, steps, q = record["noise_multiplier"], record["steps"], record["sample_rate"]
        expected = sigma * math.sqrt(steps)
        n_out = int((~included).sum())
        out["expected_mean_score_in"] = q * steps
        out["expected_std_score_out"] = expected
        if expected > 0 and n_out > 1:
            ratio = out["std_score_out"] / expected
            tolerance = max(0.1, 4.0 / math.sqrt(2.0 * n_out))
            out["noise_std_ratio"] = ratio
            out["noise_std_tolerance"] = tolerance
            if ratio < 1.0 - tolerance:
                out["noise_check"] = "LOW: less noise in the released gradients than σ implies"
            elif ratio > 1.0 + tolerance:
                out["noise_check"] = "HIGH: more noise than σ implies (e.g. added more than once)"
            else:
                out["noise_check"] = "ok"
    return out


def build_report(
    record: dict[str, Any],
    *,
    confidence: float,
    guess_counts: list[int] | None,
    configuration: dict[str, Any],
) -> tuple[dict[str, Any], AuditBound]:
    """The report dict of one audit run (``record`` from ``AuditTrainer.audit_record()``)."""
    scores = np.asarray(record["scores"], dtype=np.float64)
    included = np.asarray(record["included"], dtype=bool)
    bound = best_bound_over_guess_counts(
        scores, included, delta=record["delta"], confidence=confidence, guess_counts=guess_counts
    )
    claimed = record["claimed_epsilon"]
    report = {
        "claimed_epsilon": claimed,
        "delta": record["delta"],
        "confidence": confidence,
        "epsilon_lower_bound": bound.epsilon_lower_bound,
        "violation": bool(bound.epsilon_lower_bound > claimed),
        "canaries": bound.canaries,
        "canaries_included": int(included.sum()),
        "guesses": bound.guesses,
        "guesses_in": bound.guesses_in,
        "guesses_out": bound.guesses_out,
        "correct": bound.correct,
        "guess_counts_tried": bound.candidates,
        "canary_kind": record["canary_kind"],
        "run": {
            key: record[key]
            for key in (
                "noise_multiplier",
                "sample_rate",
                "steps",
                "expected_batch_size",
                "dataset_size",
                "records",
                "dp_size",
                "tp_size",
                "per_sample_max_grad_norm",
                "canary_gradient_norm",
                "canary_support",
                "grad_sample_mode",
                "accountant",
            )
        },
        "configuration": configuration,
        "diagnostics": score_diagnostics(scores, included, record),
        "meaning": MEANING,
    }
    return report, bound


def _text_histogram(scores: np.ndarray, included: np.ndarray, bins: int = 24) -> str:
    edges = np.histogram_bin_edges(scores, bins=bins)
    counts_in, _ = np.histogram(scores[included], bins=edges)
    counts_out, _ = np.histogram(scores[~included], bins=edges)
    top = max(1, int(max(counts_in.max(), counts_out.max())))
    width = 30
    lines = [f"{'score from':>12} {'in (#)':<{width + 6}} {'out (o)':<{width + 6}}"]
    for lo, a, b in zip(edges[:-1], counts_in, counts_out, strict=True):
        bar_in = "#" * round(width * a / top)
        bar_out = "o" * round(width * b / top)
        lines.append(f"{lo:12.4g} {bar_in:<{width}} {a:5d} {bar_out:<{width}} {b:5d}")
    return "\n".join(lines) + "\n"


def write_report(
    output_dir: str, report: dict[str, Any], scores: np.ndarray, included: np.ndarray
) -> list[str]:
    """Write the JSON report, the scores and the plot (PNG with matplotlib, else a text
    histogram) to ``output_dir``; return the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    paths = []
    path = os.path.join(output_dir, REPORT_NAME)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    paths.append(path)

    guesses = guesses_from_scores(scores, report["guesses_in"], report["guesses_out"])
    path = os.path.join(output_dir, SCORES_NAME)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["canary", "included", "score", "guess"])
        for j, (inc, score, guess) in enumerate(zip(included, scores, guesses, strict=True)):
            writer.writerow([j, int(inc), f"{score:.9g}", int(guess)])
    paths.append(path)

    title = (
        f"{report['canary_kind']} canaries: claimed ε = {report['claimed_epsilon']:.3g}, "
        f"lower bound {report['epsilon_lower_bound']:.3g} "
        f"({report['correct']}/{report['guesses']} correct)"
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path = os.path.join(output_dir, "canary_scores.txt")
        with open(path, "w") as f:
            f.write(title + "\n" + _text_histogram(scores, included))
        paths.append(path)
        return paths
    fig, ax = plt.subplots(figsize=(7, 4))
    edges = np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[included], bins=edges, alpha=0.6, label=f"in ({int(included.sum())})")
    ax.hist(scores[~included], bins=edges, alpha=0.6, label=f"out ({int((~included).sum())})")
    ax.set_xlabel("canary score")
    ax.set_ylabel("canaries")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(output_dir, "canary_scores.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths
