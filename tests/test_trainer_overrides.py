"""DPTrainer leans on private ``transformers.Trainer`` methods: it overrides some (checkpoint
choreography, gradient clipping and norms, RNG state, Hub pushes) and calls others. A
transformers upgrade that renames one or changes its signature would silently bypass a privacy
rule (e.g. an RNG-state file written again, a checkpoint pushed without its ledger), so this test
pins each signature and fails loudly, naming the method, when it changes: read the new Trainer
code, adapt the override, then update the expected signature here.

Also pinned by behaviour: a checkpoint pushed to the Hub carries its privacy ledger (Trainer
pushes from inside ``_save_checkpoint``, before DPTrainer's override of it returns).
"""

from __future__ import annotations

import inspect
import os
import warnings

import pytest
from transformers import Trainer

from hf_dp_tp import DPTrainer
from hf_dp_tp.audit.trainer import AuditTrainer

#: Private Trainer methods DPTrainer (and the audit's trainer) override or call, with the
#: signature of transformers' version that the code was written against.
EXPECTED = {
    "_build_accelerator_args": "(self, **kwargs) -> dict[str, typing.Any]",
    "_defer_fsdp_gradient_reduction": "(self)",
    "_get_grad_norm": "(self, model, grad_norm=None)",
    "_load_best_model": "(self) -> None",
    "_load_from_checkpoint": "(self, resume_from_checkpoint: str, model: "
    "torch.nn.modules.module.Module | None = None) -> None",
    "_load_optimizer_and_scheduler": "(self, checkpoint: str | None) -> None",
    "_load_rng_state": "(self, checkpoint: str | None) -> None",
    "_push_from_checkpoint": "(self, checkpoint_folder: str) -> None",
    "_save": "(self, output_dir: str | None = None, state_dict: dict | None = None) -> None",
    "_save_checkpoint": "(self, model: torch.nn.modules.module.Module, trial: 'optuna.Trial | "
    "dict[str, Any] | None') -> None",
    "_save_optimizer_and_scheduler": "(self, output_dir: str) -> None",
    "_save_rng_state": "(self, output_dir: str) -> None",
    "_sync_replicated_trainable_parameters": "(self, model: torch.nn.modules.module.Module) "
    "-> None",
    # called, not overridden
    "_remove_unused_columns": "(self, dataset: 'datasets.Dataset', description: str | None = "
    "None) -> 'datasets.Dataset'",
    "_get_collator_with_removed_columns": "(self, data_collator: collections.abc.Callable, "
    "description: str | None = None) -> collections.abc.Callable",
    "_prepare_inputs": "(self, inputs: dict[str, torch.Tensor | typing.Any]) -> "
    "dict[str, torch.Tensor | typing.Any]",
    "_get_output_dir": "(self, trial: 'optuna.Trial | dict[str, Any] | None') -> str",
}


def _overridden_private_methods() -> set[str]:
    return {
        name
        for cls in (DPTrainer, AuditTrainer)
        for name in vars(cls)
        if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)
    }


def test_every_overridden_private_trainer_method_is_pinned():
    missing = sorted(_overridden_private_methods() - set(EXPECTED))
    assert not missing, f"pin these Trainer methods DPTrainer overrides: {missing}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_private_trainer_method_signature_is_unchanged(name):
    assert hasattr(Trainer, name), (
        f"transformers.Trainer no longer has {name}: DPTrainer's override or call of it is dead "
        "code now, and the privacy rule it enforced may be bypassed. Read the new Trainer."
    )
    got = str(inspect.signature(getattr(Trainer, name)))
    assert got == EXPECTED[name], (
        f"transformers.Trainer.{name} changed signature: {got} (expected {EXPECTED[name]}). "
        "Read the new Trainer code, adapt DPTrainer, then update EXPECTED."
    )


def test_a_checkpoint_pushed_to_the_hub_carries_its_ledger(tmp_path, monkeypatch):
    import transformers.trainer

    from tests import models
    from tests.test_trainer import _args, _dataset
    from tests.test_user_seed_redaction import _FakeHub

    hub = _FakeHub(tmp_path / "hub")
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    args = _args(
        str(tmp_path / "out"),
        tp_size=1,
        grad_sample_mode="hooks",
        noise_multiplier=1.0,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        push_to_hub=True,
        hub_model_id="dp-ledger",
        hub_strategy="checkpoint",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DPTrainer(model=models.tiny_causal_lm(), args=args, train_dataset=_dataset()).train()
    pushed_checkpoints = [
        folder for where, folder in hub.uploads if where and where.startswith("last-checkpoint")
    ]
    assert len(pushed_checkpoints) == 2
    for folder in pushed_checkpoints:
        assert os.path.exists(os.path.join(folder, "dp_ledger.json")), os.listdir(folder)
