"""Privacy outside the step, tried as an attacker and as a careless user would (tp=2, gloo).

One spawned pair of ranks runs every scenario in sequence (a shared process group keeps the suite
fast); each test below reads its part of the results.

1. **Secrets at rest.** Runs with checkpoints in seeded, secure and user-fixed-seed mode: no file
   under ``output_dir`` (JSON, ``.pt`` zips member by member, everything else as bytes) holds the
   seed/key in any encoding. The opt-in secrets file lies outside ``output_dir`` with mode 0600
   and replays the seed; inside ``output_dir`` it is refused.
2. **Resume that spends what it reports.** A lower ``target_epsilon`` on resume stops within it;
   a stale ledger, stale optimizer files, a different σ, a corrupt ledger, a pickle payload in
   the optimizer files, and ``ignore_data_skip`` with a replayed seed are refused; with fresh
   randomness ``ignore_data_skip`` draws fresh batches (not the checkpoint's).
3. **Realised batch sizes stay private.** ``total_flos`` does not depend on the sampled batches.
4. **Resumes that fail, fail on every rank at once.** A checkpoint written by another parallel
   layout (tp=2 resumed as dp=2 × tp=1) is refused before any step, naming both layouts; a
   check that fails on one rank only (a pickle payload in ``optimizer.rank0.pt``, a stale
   ``optimizer.rank1.pt``, a corrupt ledger in rank 1's copy of the checkpoint) makes every rank raise promptly with the reason, not wait for ``ddp_timeout``.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
import warnings

import pytest
import torch

from tests import models
from tests.distributed_harness import run_distributed
from tests.secret_scan import blobs, key_encodings, seed_encodings
from tests.test_trainer import SEQ, _args

USER_SEED = 8734512987123457  # long enough that no file holds its digits by chance
#: ddp_timeout of the one-rank-fails scenarios: a rank left waiting would fail after this long
#: with a timeout error instead of the reason.
SHORT_TIMEOUT = 60
NOISY = dict(
    per_device_train_batch_size=32,
    optim="adamw_torch",
    learning_rate=1e-2,
    per_sample_max_grad_norm=1.0,
    dp_seed=None,
)


def _data():
    from datasets import Dataset

    return Dataset.from_dict(models.markov_records(256, SEQ, vocab=64, seed=1))


def _recording_trainer_class():
    from hf_dp_tp import DPTrainer

    class RecordingTrainer(DPTrainer):
        """Records a fingerprint of every training micro-batch."""

        def training_step(self, model, inputs, *args, **kwargs):
            ids = inputs["input_ids"]
            self.batches.append((ids.shape[0], int(ids.sum())))
            return super().training_step(model, inputs, *args, **kwargs)

    return RecordingTrainer


def _trainer(model_dir: str, out: str, **overrides):
    cls = _recording_trainer_class()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(
            model=models.load_tiny_llama(model_dir),
            args=_args(out, **{**NOISY, **overrides}),
            train_dataset=_data(),
        )
    trainer.batches = []
    return trainer


def _train(trainer, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(**kwargs)
    return trainer


def _integrity_worker(rank: int, world: int, model_dir: str, root: str) -> dict:
    results: dict = {}

    def expect(name, fn):
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - the message is the result
            results[name] = f"{type(err).__name__}: {err}"
        else:
            results[name] = "NO ERROR"

    # 1. secrets at rest: seeded (fresh), secure, user-fixed seed; checkpoints + final model
    for mode, extra in (
        ("seeded", {}),
        ("secure", {"secure_mode": True}),
        ("user_seed", {"dp_seed": USER_SEED}),
    ):
        out = os.path.join(root, mode)
        trainer = _train(
            _trainer(
                model_dir,
                out,
                noise_multiplier=1.0,
                max_steps=2,
                save_strategy="steps",
                save_steps=1,
                **extra,
            )
        )
        trainer.save_model()
        results[mode] = {
            "seed": trainer.dp_seed,
            "key": trainer.secure_key,
            "total_flos": trainer.state.total_flos,
            "batch_sizes": [size for size, _ in trainer.batches],
        }

    secrets = os.path.join(root, "private", "secrets.json")
    first = _trainer(model_dir, os.path.join(root, "with_secrets"), dp_secrets_file=secrets)
    second = _trainer(model_dir, os.path.join(root, "with_secrets"), dp_secrets_file=secrets)
    results["secrets_file"] = {"first": first.dp_seed, "second": second.dp_seed}
    inside = os.path.join(root, "seeded", "secrets.json")
    expect(
        "secrets_inside_output_dir",
        lambda: _trainer(model_dir, os.path.join(root, "seeded"), dp_secrets_file=inside),
    )

    # 2. resume: a base run calibrated for ε=8 over 6 steps, checkpoints at steps 3 and 6
    base_dir = os.path.join(root, "base")
    base = _train(
        _trainer(
            model_dir,
            base_dir,
            target_epsilon=8.0,
            noise_multiplier=None,
            max_steps=6,
            save_strategy="steps",
            save_steps=3,
        )
    )
    eps = [h["epsilon"] for h in base.state.log_history if "loss" in h]
    results["base"] = {"epsilons": eps, "batches": base.batches, "sigma": base.noise_multiplier}
    ck3, ck6 = (os.path.join(base_dir, f"checkpoint-{k}") for k in (3, 6))

    # a lower target on resume: stops within it
    lower = (eps[2] + eps[5]) / 2
    resumed = _train(
        _trainer(
            model_dir,
            base_dir,
            target_epsilon=lower,
            noise_multiplier=None,
            max_steps=6,
            save_strategy="no",
        ),
        resume_from_checkpoint=ck3,
    )
    results["lower_target"] = {
        "target": lower,
        "epsilon": resumed.get_epsilon(),
        "steps": resumed.state.global_step,
        "report": resumed.privacy_report(),
    }
    # a target already spent: refused before any step
    expect(
        "target_already_spent",
        lambda: _train(
            _trainer(
                model_dir,
                base_dir,
                target_epsilon=eps[2] * 0.9,
                noise_multiplier=None,
                max_steps=6,
                save_strategy="no",
            ),
            resume_from_checkpoint=ck3,
        ),
    )

    def resume_from(checkpoint, **overrides):
        settings = dict(target_epsilon=8.0, noise_multiplier=None, max_steps=6, save_strategy="no")
        settings.update(overrides)
        return lambda: _train(
            _trainer(model_dir, os.path.join(root, "resumes"), **settings),
            resume_from_checkpoint=checkpoint,
        )

    # tampered copies of the checkpoints: written by rank 0, read by both ranks
    tampered = os.path.join(root, "tampered")
    stale, stale_opt, corrupt, payload = (
        os.path.join(tampered, name)
        for name in ("stale-ledger", "stale-optimizer", "corrupt", "payload")
    )
    marker = os.path.join(root, f"payload-ran-{rank}")
    if rank == 0:
        shutil.copytree(ck6, stale)
        shutil.copy(os.path.join(ck3, "dp_ledger.json"), stale)
        shutil.copytree(ck6, stale_opt)
        for name in os.listdir(ck3):
            if name.startswith("optimizer"):
                shutil.copy(os.path.join(ck3, name), stale_opt)
        shutil.copytree(ck3, corrupt)
        with open(os.path.join(corrupt, "dp_ledger.json"), "r+") as f:
            f.truncate(40)
        shutil.copytree(ck3, payload)
        for r in range(world):
            torch.save(
                _Payload(os.path.join(root, f"payload-ran-{r}")),
                os.path.join(payload, f"optimizer.rank{r}.pt"),
            )
    torch.distributed.barrier()

    expect("stale_ledger", resume_from(stale))
    expect(
        "stale_optimizer",
        resume_from(
            stale_opt, target_epsilon=None, noise_multiplier=base.noise_multiplier, max_steps=8
        ),
    )
    expect(
        "different_sigma",
        resume_from(ck3, target_epsilon=None, noise_multiplier=base.noise_multiplier * 1.5),
    )
    expect("corrupt_ledger", resume_from(corrupt))
    expect("pickle_payload", resume_from(payload))
    results["payload_ran"] = os.path.exists(marker)

    # ignore_data_skip: fresh randomness gives fresh batches; a replayed seed is refused
    fresh = _train(
        _trainer(
            model_dir,
            os.path.join(root, "resumes"),
            target_epsilon=8.0,
            noise_multiplier=None,
            max_steps=6,
            save_strategy="no",
            ignore_data_skip=True,
        ),
        resume_from_checkpoint=ck3,
    )
    results["ignore_data_skip_batches"] = fresh.batches
    seeded_dir = os.path.join(root, "seeded_base")
    _train(
        _trainer(
            model_dir,
            seeded_dir,
            noise_multiplier=1.0,
            max_steps=2,
            dp_seed=3,
            save_strategy="steps",
            save_steps=1,
        )
    )
    expect(
        "ignore_data_skip_replayed_seed",
        lambda: _train(
            _trainer(
                model_dir,
                seeded_dir,
                noise_multiplier=1.0,
                max_steps=2,
                dp_seed=3,
                save_strategy="no",
                ignore_data_skip=True,
            ),
            resume_from_checkpoint=os.path.join(seeded_dir, "checkpoint-1"),
        ),
    )

    # 4. another layout: ck3 was written by dp=1 × tp=2; resumed as dp=2 × tp=1 (half the
    # per-device batch keeps B̄ and q), it is refused before any step and spends nothing
    ledger_before = _read(os.path.join(ck3, "dp_ledger.json"))
    relayout = _trainer(
        model_dir,
        os.path.join(root, "relayout"),
        tp_size=1,
        per_device_train_batch_size=NOISY["per_device_train_batch_size"] // 2,
        target_epsilon=8.0,
        noise_multiplier=None,
        max_steps=6,
        save_strategy="no",
        ddp_timeout=SHORT_TIMEOUT,
    )
    expect("other_layout", lambda: _train(relayout, resume_from_checkpoint=ck3))
    results["other_layout_after"] = {
        "batches": relayout.batches,
        "steps_accounted": relayout.privacy_plan.steps_accounted,
        "ledger_unchanged": _read(os.path.join(ck3, "dp_ledger.json")) == ledger_before,
        "files_written": sorted(os.listdir(os.path.join(root, "relayout")))
        if os.path.isdir(os.path.join(root, "relayout"))
        else [],
    }

    # a check that fails on one rank only: every rank raises at once, with the reason
    one_rank = {
        name: os.path.join(tampered, name) for name in ("payload-rank0", "stale-optimizer-rank1")
    }
    if rank == 0:
        shutil.copytree(ck3, one_rank["payload-rank0"])
        torch.save(
            _Payload(os.path.join(root, "payload-ran-rank0-only")),
            os.path.join(one_rank["payload-rank0"], "optimizer.rank0.pt"),
        )
        shutil.copytree(ck6, one_rank["stale-optimizer-rank1"])
        shutil.copy(os.path.join(ck3, "optimizer.rank1.pt"), one_rank["stale-optimizer-rank1"])
    torch.distributed.barrier()

    def timed(name, fn):
        start = time.monotonic()
        expect(name, fn)
        results[f"{name}_seconds"] = time.monotonic() - start

    short = dict(ddp_timeout=SHORT_TIMEOUT)
    timed("payload_rank0_only", resume_from(one_rank["payload-rank0"], **short))
    timed(
        "stale_optimizer_rank1_only",
        resume_from(
            one_rank["stale-optimizer-rank1"],
            target_epsilon=None,
            noise_multiplier=base.noise_multiplier,
            max_steps=8,
            **short,
        ),
    )
    # rank 1 reads its own (corrupt) copy of the checkpoint, as on a node without a shared disk
    timed("corrupt_ledger_rank1_only", resume_from(ck3 if rank == 0 else corrupt, **short))
    results["one_rank_payload_ran"] = any(
        os.path.exists(os.path.join(root, name)) for name in ("payload-ran-rank0-only",)
    )
    return results


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class _Payload:
    """A pickle that creates a file when unpickled with ``weights_only=False``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def integrity(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    model_dir = models.save_tiny_llama(str(root / "model"))
    results = run_distributed(_integrity_worker, 2, model_dir, str(root / "runs"))
    return results, root / "runs"


# --------------------------------------------------------------------------- 1. secrets at rest
@pytest.mark.parametrize("mode", ["seeded", "secure", "user_seed"])
def test_no_seed_or_key_is_written_under_output_dir(integrity, mode):
    results, runs = integrity
    found = results[0][mode]
    secret = found["key"] if mode == "secure" else found["seed"]
    assert secret is not None
    assert results[1][mode]["seed"] == found["seed"] and results[1][mode]["key"] == found["key"]
    encodings = key_encodings(secret) if mode == "secure" else seed_encodings(secret)
    out = runs / mode
    files = 0
    for where, blob in blobs(out):
        files += 1
        for encoding in encodings:
            assert encoding not in blob, f"{mode} secret found in {where}"
    names = {p.name for p in out.rglob("*")}
    assert {"dp_ledger.json", "optimizer.rank1.pt", "model.safetensors"} <= names
    assert files > 20  # two checkpoints and the final model were searched


def test_secrets_file_is_opt_in_private_and_outside_output_dir(integrity):
    results, runs = integrity
    path = runs / "private" / "secrets.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    seeds = results[0]["secrets_file"]
    assert seeds["first"] == seeds["second"] == results[1]["secrets_file"]["first"]
    assert json.loads(path.read_text()) == {"mode": "seeded", "seed": seeds["first"]}
    for r in results:
        assert "lies inside output_dir" in r["secrets_inside_output_dir"]


def test_total_flos_does_not_reveal_realised_batch_sizes(integrity):
    results, _ = integrity
    runs = [results[0][mode] for mode in ("seeded", "secure", "user_seed")]
    sizes = [tuple(r["batch_sizes"]) for r in runs]
    assert len(set(sizes)) > 1, sizes  # the sampled batches differ between the runs ...
    flos = {r["total_flos"] for r in runs}
    assert len(flos) == 1 and flos.pop() > 0  # ... their FLOP count does not


# --------------------------------------------------------------------------- 2. resume
def test_lower_target_on_resume_is_respected(integrity):
    results, _ = integrity
    base, lower = results[0]["base"], results[0]["lower_target"]
    assert base["epsilons"][-1] <= 8.0
    print("base ε per step", base["epsilons"], "resumed with target", lower["target"])
    assert 3 < lower["steps"] < 6
    assert lower["epsilon"] <= lower["target"]
    assert lower["report"]["target_epsilon"] == lower["target"]
    assert lower["report"]["epsilon"] <= lower["report"]["target_epsilon"]
    for r in results:
        assert "exceeds target_epsilon" in r["target_already_spent"]


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("stale_ledger", r"stale-ledger/dp_ledger.json records step 3 but its checkpoint is at"),
        ("stale_optimizer", r"optimizer state is from noisy step 3 but the privacy ledger"),
        ("different_sigma", r"noise_multiplier=.* but the checkpoint was trained with σ="),
        ("corrupt_ledger", r"corrupt/dp_ledger.json is unreadable or corrupt"),
        ("pickle_payload", r"refusing to load .*optimizer.rank\d.pt"),
        ("ignore_data_skip_replayed_seed", r"ignore_data_skip=True with a replayed seed"),
    ],
)
def test_dishonest_resumes_are_refused(integrity, name, pattern):
    import re

    results, _ = integrity
    for r in results:
        assert re.search(pattern, r[name]), (name, r[name])


def test_pickle_payload_never_runs(integrity):
    results, _ = integrity
    assert not any(r["payload_ran"] for r in results)


def test_ignore_data_skip_with_fresh_randomness_draws_fresh_batches(integrity):
    results, _ = integrity
    used = results[0]["base"]["batches"][:3]
    redrawn = results[0]["ignore_data_skip_batches"]
    assert len(redrawn) == 3  # steps 4-6, drawn from the start of the epoch again ...
    assert redrawn != used  # ... with fresh randomness: not the checkpointed run's batches
    assert results[1]["ignore_data_skip_batches"] == redrawn  # TP peers agree


# --------------------------------------------------------------------------- 4. failing together
def test_resume_on_another_layout_is_refused_before_any_step(integrity):
    results, _ = integrity
    for r in results:
        message = r["other_layout"]
        print("other_layout:", message)
        assert "LedgerError" in message, message
        assert "written by world_size=2 (dp=1 × tp=2, dp_shard=1, dp_replicate=1)" in message
        assert "this run is world_size=2 (dp=2 × tp=1, dp_shard=1, dp_replicate=1)" in message
        after = r["other_layout_after"]
        assert after["batches"] == []  # no forward, no noise ...
        assert after["steps_accounted"] == 0  # ... no accountant step
        assert after["ledger_unchanged"] and after["files_written"] == []


@pytest.mark.parametrize(
    "name, failing, pattern",
    [
        ("payload_rank0_only", "rank 0", r"refusing to load .*optimizer\.rank0\.pt"),
        (
            "stale_optimizer_rank1_only",
            "rank 1",
            r"optimizer state is from noisy step 3 but the privacy ledger records 6",
        ),
        ("corrupt_ledger_rank1_only", "rank 1", r"corrupt/dp_ledger.json is unreadable or corrupt"),
    ],
)
def test_a_check_failing_on_one_rank_stops_every_rank_at_once(integrity, name, failing, pattern):
    """Before, the other rank went on and waited in a collective until ddp_timeout."""
    import re

    results, _ = integrity
    for rank, r in enumerate(results):
        message = r[name]
        print(f"{name} rank {rank}: {r[f'{name}_seconds']:.1f} s: {message}")
        assert f"failed on 1 of 2 ranks, so every rank stops: [{failing}]" in message, message
        assert re.search(pattern, message), message
        assert "timed out" not in message.lower() and "timeout" not in message.lower()
        assert r[f"{name}_seconds"] < SHORT_TIMEOUT / 2, r[f"{name}_seconds"]
    assert not any(r["one_rank_payload_ran"] for r in results)


def test_ledger_without_layout_is_resumed_only_where_the_layout_cannot_matter(tmp_path):
    """A ledger from before the layout was recorded: accepted for pure data parallelism without
    per-rank optimizer files (every rank holds the whole state), refused otherwise."""
    from hf_dp_tp.privacy_plan import LedgerError, check_layout

    layout = dict(world_size=2, dp_size=2, tp_size=1, dp_shard_size=1, dp_replicate_size=1)
    old = {"version": 2}  # no "layout" key
    check_layout(old, layout, where=str(tmp_path), rank_specific_state=False)
    with pytest.raises(LedgerError, match=r"does not record the parallel layout.*holds 0"):
        check_layout(old, layout, where=str(tmp_path), rank_specific_state=True)
    for r in range(2):
        (tmp_path / f"optimizer.rank{r}.pt").write_bytes(b"")
    with pytest.raises(LedgerError, match=r"holds 2 per-rank optimizer files.*world_size=2 \(dp=2"):
        check_layout(old, layout, where=str(tmp_path), rank_specific_state=False)
    check_layout({"layout": layout}, layout, where=str(tmp_path), rank_specific_state=True)
    with pytest.raises(LedgerError, match="layout .* is malformed"):
        check_layout(
            {"layout": {"tp_size": 2}}, layout, where=str(tmp_path), rank_specific_state=True
        )
    hsdp = {**layout, "dp_shard_size": 2}
    with pytest.raises(LedgerError, match=r"written by world_size=2 \(dp=2 × tp=1, dp_shard=2"):
        check_layout({"layout": hsdp}, layout, where=str(tmp_path), rank_specific_state=True)
