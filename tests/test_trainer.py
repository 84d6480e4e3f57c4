"""DPTrainer end to end (spawned gloo ranks running ``DPTrainer.train()``).

1. One step through ``train()`` on a tiny Llama (tp=2, dp=2×tp=2, and with
   gradient_accumulation_steps=2), σ=0, a clip norm below every per-sample norm, SGD lr=1 and
   sampling rate 1 (every record in the logical batch): the *saved checkpoint*, loaded in this
   process with ``from_pretrained``, equals single-process DP-SGD computed here independently —
   per-sample grads of each sample's mean token loss over its own labels, clipped, summed, / B̄.
2. Noise on: the loss falls; ε in the logs grows every step and equals opacus's accountant for
   (σ, q, steps); the privacy report is written.
3. Resume: k steps, stop, resume from the checkpoint → the same ε, ledger and weights as an
   uninterrupted run with the same seeds; a checkpoint without a ledger is refused.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch

from hf_dp_tp.losses import token_mean_per_sample
from tests import models
from tests.distributed_harness import run_distributed

N, SEQ = 8, 8


def _records(n: int = N, seed: int = 5) -> dict[str, list]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, SEQ), generator=g)
    labels = ids.clone()
    labels[::3, :3] = -100  # per-sample label masks of different lengths
    return {"input_ids": ids.tolist(), "labels": labels.tolist()}


def _dataset(n: int = N, seed: int = 5):
    from datasets import Dataset

    return Dataset.from_dict(_records(n, seed))


def _args(out: str, **overrides):
    from hf_dp_tp import DPTrainingArguments

    defaults = dict(
        output_dir=out,
        tp_size=2,
        noise_multiplier=0.0,
        per_sample_max_grad_norm=1.0,
        per_device_train_batch_size=N,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_steps=1,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dp_seed=3,
        disable_tqdm=True,
    )
    defaults.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPTrainingArguments(**defaults)


def _launch_overrides(overrides: dict) -> dict:
    """A copy of ``overrides`` with the launch settings applied: ``local_world_size`` (processes
    per "node", for fsdp="hybrid_shard") and a ``parallelism_config`` given as a dict."""
    overrides = dict(overrides)
    if "local_world_size" in overrides:
        os.environ["LOCAL_WORLD_SIZE"] = str(overrides.pop("local_world_size"))
    if isinstance(overrides.get("parallelism_config"), dict):
        from accelerate import ParallelismConfig

        overrides["parallelism_config"] = ParallelismConfig(**overrides["parallelism_config"])
    return overrides


def _train_worker(rank: int, world: int, model_dir: str, out: str, overrides: dict) -> dict:
    from transformers import AutoModelForCausalLM

    from hf_dp_tp import DPTrainer

    overrides = _launch_overrides(overrides)
    if overrides.pop("load_with_tp_plan", False):
        # transformers' own TP loading (each rank reads its shards); DPTrainer takes it as is
        from transformers.distributed import DistributedConfig

        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float64, distributed_config=DistributedConfig(tp_size=2)
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    record = overrides.pop("record_batch_sizes", False)
    if overrides.pop("stream_everything", False):  # every FSDP sum streamed, however small
        from hf_dp_tp import optimizer as optimizer_module

        optimizer_module._REDUCE_SCATTER_MIN_NUMEL = 0
    args = _args(out, **overrides)
    sizes: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPTrainer(model=model, args=args, train_dataset=_dataset())
        if record:
            step = trainer.training_step

            def recording_step(model, inputs, *args, **kwargs):
                sizes.append(len(inputs["input_ids"]))
                return step(model, inputs, *args, **kwargs)

            trainer.training_step = recording_step
        trainer.train()
    trainer.save_model()
    mesh = trainer.device_mesh
    return {
        "batch_sizes": sizes,
        "log_history": trainer.state.log_history,
        "epsilon": trainer.get_epsilon(),
        "checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "mesh": None if mesh is None else dict(zip(mesh.mesh_dim_names, mesh.shape, strict=True)),
    }


def _reference_update(model_dir: str, clip: float | None = None):
    model = models.load_tiny_llama(model_dir).double()
    records = _records()
    batch = {k: torch.tensor(v) for k, v in records.items()}

    def losses(m, b):
        ids = b["input_ids"]
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        logits = m(input_ids=ids, position_ids=positions).logits
        return token_mean_per_sample(logits, b["labels"])

    grads, norms = models.reference_per_sample_grads(model, losses, batch)
    if clip is None:
        return norms
    update = models.reference_dp_update(grads, norms, clip, N)
    before = models.full_params(model)
    return {k: before[k] - update[k] for k in update}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return models.save_tiny_llama(str(tmp_path_factory.mktemp("llama") / "model"))


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    return models.save_tiny_llama(str(tmp_path_factory.mktemp("tied") / "model"), tie=True)


def _assert_saved_equals_reference(model_dir: str, out: str, expected: dict) -> float:
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)  # one process, plain
    params = dict(saved.named_parameters())
    assert set(params) == set(expected)
    worst = 0.0
    for name, want in expected.items():
        before = models.full_params(models.load_tiny_llama(model_dir).double())[name]
        scale = (want - before).abs().max().clamp_min(1e-12)
        worst = max(worst, ((params[name].detach() - want).abs().max() / scale).item())
    return worst


@pytest.mark.parametrize(
    "world, overrides",
    [
        pytest.param(2, {}, id="tp2"),
        pytest.param(
            2, {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}, id="tp2_ga2"
        ),
        pytest.param(4, {"per_device_train_batch_size": 4}, id="dp2_tp2", marks=pytest.mark.slow),
        pytest.param(2, {"gradient_checkpointing": True}, id="tp2_checkpointing"),
        pytest.param(
            2,
            {
                "grad_sample_mode": "ghost",
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2,
                "gradient_checkpointing": True,
            },
            id="tp2_ghost_ga2_checkpointing",
        ),
        pytest.param(
            4,
            {"grad_sample_mode": "ghost", "per_device_train_batch_size": 4},
            id="dp2_tp2_ghost",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            4,
            {
                "fsdp": "full_shard",
                "grad_sample_mode": "ghost",
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 2,
            },
            id="fsdp2_tp2_ghost_ga2",
        ),
        pytest.param(
            2,
            {
                "fsdp": "full_shard",
                "tp_size": 1,
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 2,
            },
            id="fsdp2_only_tp_ga2",
        ),
        pytest.param(
            4,
            {
                "parallelism_config": {"dp_replicate_size": 2, "dp_shard_size": 2, "tp_size": 1},
                "tp_size": 1,
                "grad_sample_mode": "ghost",
                "per_device_train_batch_size": 1,
                "gradient_accumulation_steps": 2,
            },
            id="hsdp2x2_parallelism_config_ghost_ga2",
        ),
        pytest.param(
            8,
            {
                "fsdp": "hybrid_shard auto_wrap",
                "local_world_size": 4,
                "per_device_train_batch_size": 2,
            },
            id="hsdp2x2_hybrid_shard_tp2",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            2,
            {
                "gradient_checkpointing": True,
                "gradient_checkpointing_kwargs": {"use_reentrant": True},
            },
            id="tp2_checkpointing_reentrant",
        ),
    ],
)
def test_train_one_step_equals_single_process_dp_sgd(llama_dir, tmp_path, world, overrides):
    _one_step_equivalence(llama_dir, tmp_path, world, overrides)


def test_fsdp_with_empty_micro_batches_equals_replicated_dp(llama_dir, tmp_path):
    """Poisson micro-batches empty on one DP rank and not on the other (q = 0.5, one record per
    micro-batch on average): under FSDP the empty rank runs a discarded stand-in pass (FSDP's
    all-gathers need every rank) and streams zero sums in lockstep. Three steps with σ = 0 end
    with the same weights as replicated DP on the same batches."""
    from transformers import AutoModelForCausalLM

    common = dict(
        tp_size=1,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=3,
        grad_sample_mode="ghost",
        per_sample_max_grad_norm=0.05,
        record_batch_sizes=True,
    )
    fsdp_out, dp_out = str(tmp_path / "fsdp"), str(tmp_path / "dp")
    fsdp = run_distributed(
        _train_worker,
        2,
        llama_dir,
        fsdp_out,
        {**common, "fsdp": "full_shard", "stream_everything": True},
    )
    replicated = run_distributed(_train_worker, 2, llama_dir, dp_out, common)
    sizes = [r["batch_sizes"] for r in fsdp]
    print("micro-batch sizes per rank:", sizes)
    assert sizes == [r["batch_sizes"] for r in replicated]
    assert any((a == 0) != (b == 0) for a, b in zip(*sizes, strict=True)), sizes
    got, want = (
        dict(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).named_parameters())
        for out in (fsdp_out, dp_out)
    )
    start = dict(
        AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).named_parameters()
    )
    worst = 0.0
    for name, value in want.items():
        moved = (value - start[name]).abs().max().clamp_min(1e-12)
        worst = max(worst, ((got[name] - value).abs().max() / moved).item())
    print(f"FSDP vs replicated DP after 3 steps: relative error {worst:.3g}")
    assert worst < 1e-9


@pytest.mark.slow
def test_two_local_nodes_equal_single_process_dp_sgd(tied_llama_dir, tmp_path):
    """The multi-node launch through DPTrainer: two ``torchrun --nnodes 2`` launchers on
    localhost, 2 processes each. FSDP across the "nodes" with TP inside one (tied Llama, ghost,
    gradient accumulation), then HSDP (``fsdp="hybrid_shard"``: one replica per node, FSDP over
    its 2 processes); each saved checkpoint equals single-process DP-SGD."""
    import json

    from tests.distributed_harness import run_on_two_local_nodes

    clip = 0.5 * _reference_update(tied_llama_dir).min().item()
    expected = _reference_update(tied_llama_dir, clip)
    common = {"per_sample_max_grad_norm": clip, "grad_sample_mode": "ghost"}
    runs = [
        (
            str(tmp_path / "fsdp_tp"),
            {
                **common,
                "fsdp": "full_shard",
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 2,
            },
        ),
        (
            str(tmp_path / "hsdp"),
            {**common, "fsdp": "hybrid_shard", "tp_size": 1, "per_device_train_batch_size": 2},
        ),
    ]
    run_on_two_local_nodes(
        ["-m", "tests.trainer_two_node_worker", tied_llama_dir, json.dumps(runs)], timeout=420
    )
    meshes = [{"dp": 2, "tp": 2}, {"dp_replicate": 2, "dp_shard": 2, "tp": 1}]
    for (out, overrides), mesh in zip(runs, meshes, strict=True):
        with open(os.path.join(out, "mesh.json")) as f:
            assert json.load(f) == mesh
        err = _assert_saved_equals_reference(tied_llama_dir, out, expected)
        print(f"two nodes {overrides}: saved checkpoint vs reference, relative error {err:.3g}")
        assert err < 1e-9


@pytest.mark.parametrize(
    "world, overrides",
    [
        pytest.param(2, {"grad_sample_mode": "tp"}, id="tp"),
        pytest.param(2, {"grad_sample_mode": "ghost"}, id="ghost"),
        pytest.param(
            4,
            {
                "grad_sample_mode": "ghost",
                "fsdp": "full_shard",
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 2,
            },
            id="fsdp2_tp2_ghost_ga2",
        ),
    ],
)
def test_tied_embeddings_one_step_and_plain_save(tied_llama_dir, tmp_path, world, overrides):
    """The tied weight's update is the sum of both uses (its norm, in ghost mode, includes the
    cross term of the two uses), also when FSDP shards it over DP; the saved checkpoint stays
    tied."""
    from transformers import AutoModelForCausalLM

    _one_step_equivalence(tied_llama_dir, tmp_path, world, overrides)
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert saved.lm_head.weight is saved.model.embed_tokens.weight


def test_model_loaded_with_transformers_tp_plan(llama_dir, tmp_path):
    _one_step_equivalence(llama_dir, tmp_path, 2, {"load_with_tp_plan": True})


def _one_step_equivalence(llama_dir, tmp_path, world, overrides):
    clip = 0.5 * _reference_update(llama_dir).min().item()
    expected = _reference_update(llama_dir, clip)
    out = str(tmp_path / "out")
    results = run_distributed(
        _train_worker, world, llama_dir, out, {"per_sample_max_grad_norm": clip, **overrides}
    )
    assert results[0]["log_history"][0]["epsilon"] == math.inf
    assert results[0]["checkpointing"] == bool(overrides.get("gradient_checkpointing"))
    if "parallelism_config" in overrides or "hybrid_shard" in str(overrides.get("fsdp")):
        tp = overrides.get("tp_size", 2)
        replicas = 2
        assert results[0]["mesh"] == {
            "dp_replicate": replicas,
            "dp_shard": world // (replicas * tp),
            "tp": tp,
        }, results[0]["mesh"]
    err = _assert_saved_equals_reference(llama_dir, out, expected)
    print(f"world={world} {overrides}: saved checkpoint vs reference, relative error {err:.3g}")
    assert err < 1e-9


def _maybe_lora(model, overrides: dict):
    if not overrides.pop("lora", False):
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(
        model, LoraConfig(target_modules=models.LLAMA_PROJECTIONS, r=4, lora_alpha=8)
    )


def _load(model_dir: str, load_with_tp_plan: bool):
    from transformers import AutoModelForCausalLM

    if not load_with_tp_plan:
        return AutoModelForCausalLM.from_pretrained(model_dir)
    from transformers.distributed import DistributedConfig

    return AutoModelForCausalLM.from_pretrained(
        model_dir, distributed_config=DistributedConfig(tp_size=2)
    )


def _noisy_worker(rank: int, world: int, model_dir: str, out: str, overrides: dict) -> dict:

    from hf_dp_tp import DPTrainer

    overrides = _launch_overrides(overrides)
    model = _maybe_lora(_load(model_dir, overrides.pop("load_with_tp_plan", False)), overrides)
    data = models.markov_records(256, SEQ, vocab=64, seed=1)
    from datasets import Dataset

    args = _args(out, **overrides)
    trainer = DPTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data))
    trainer.train()
    return {
        "log_history": trainer.state.log_history,
        "sigma": trainer.noise_multiplier,
        "q": trainer.sample_rate,
        "ledger": trainer.ledger(),
        "params": {k: v.clone() for k, v in models.full_params(trainer.model).items()},
    }


NOISY = dict(
    noise_multiplier=0.6,
    per_device_train_batch_size=32,
    optim="adamw_torch",
    learning_rate=2e-2,
    max_steps=6,
    per_sample_max_grad_norm=1.0,
)


def test_noisy_training_logs_epsilon_matching_opacus(llama_dir, tmp_path):
    from opacus.accountants import create_accountant

    out = str(tmp_path / "noisy")
    r0, r1 = run_distributed(_noisy_worker, 2, llama_dir, out, NOISY)
    steps = [h for h in r0["log_history"] if "loss" in h and "epsilon" in h]
    assert len(steps) == NOISY["max_steps"]
    losses = [h["loss"] for h in steps]
    eps = [h["epsilon"] for h in steps]
    print("loss per step", losses, "epsilon per step", eps)
    assert losses[-1] < losses[0]
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    assert {h["delta"] for h in steps} == {1e-5}  # default min(1e-5, 1/(10 N)), N = 256
    reference = create_accountant("prv")
    for i, logged in enumerate(eps):
        reference.step(noise_multiplier=r0["sigma"], sample_rate=r0["q"])
        assert logged == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9), i
    report = json.load(open(os.path.join(out, "privacy_report.json")))
    assert report["epsilon"] == pytest.approx(eps[-1])
    assert report["steps"] == NOISY["max_steps"] and report["noise_multiplier"] == 0.6
    # TP peers hold identical replicated parameters and the same ε
    assert r0["ledger"] == r1["ledger"]
    for name, value in r0["params"].items():
        assert torch.equal(value, r1["params"][name]), name


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param({}, id="full"),
        pytest.param({"lora": True}, id="lora", marks=pytest.mark.slow),
        # sharded at load time by transformers: Trainer alone refuses to checkpoint it
        pytest.param(
            {"load_with_tp_plan": True}, id="transformers-tp-loading", marks=pytest.mark.slow
        ),
        # FSDP2 over dp=2 (tp_size=1), ghost clipping: the model and the optimizer state are
        # saved as per-rank shards (torch.distributed.checkpoint), never gathered
        pytest.param(
            {"fsdp": "full_shard", "tp_size": 1, "grad_sample_mode": "ghost"}, id="fsdp-ghost"
        ),
    ],
)
def test_resume_continues_epsilon_and_model_exactly(llama_dir, tmp_path, variant):
    noisy = {**NOISY, **variant}
    world = noisy.pop("world", 2)
    straight = str(tmp_path / "straight")
    full = run_distributed(_noisy_worker, world, llama_dir, straight, noisy)[0]

    split = str(tmp_path / "split")
    run_distributed(
        _noisy_worker, world, llama_dir, split, {**noisy, "save_steps": 3, "save_strategy": "steps"}
    )
    checkpoint = os.path.join(split, "checkpoint-3")
    files = sorted(os.listdir(checkpoint))
    if "fsdp" in noisy:  # sharded: no full model file, one optimizer shard per rank
        assert "pytorch_model_fsdp_0" in files and "model.safetensors" not in files, files
        assert "config.json" in files and "dp_ledger.json" in files, files
        assert [f for f in files if f.startswith("optimizer.rank")] == [
            f"optimizer.rank{r}.pt" for r in range(world)
        ], files
    # a fresh run with the same seeds, resumed from the step-3 checkpoint
    resumed = run_distributed(
        _resume_worker, world, llama_dir, split, {**noisy, "save_strategy": "no"}, "checkpoint-3"
    )[0]
    assert resumed["ledger"]["accountant"] == full["ledger"]["accountant"]
    assert resumed["ledger"]["optimizer"]["steps_taken"] == NOISY["max_steps"]
    eps_full = [h["epsilon"] for h in full["log_history"] if "loss" in h]
    eps_resumed = [h["epsilon"] for h in resumed["log_history"] if "loss" in h]
    # the resumed trainer state carries the first 3 log records; steps 4-6 are new
    assert len(eps_resumed) == len(eps_full) == NOISY["max_steps"]
    assert eps_resumed == pytest.approx(eps_full, rel=1e-12)
    for name, value in full["params"].items():
        assert torch.allclose(value, resumed["params"][name], rtol=0, atol=1e-6), name


def _resume_worker(rank, world, model_dir, out, overrides, checkpoint):
    from datasets import Dataset

    from hf_dp_tp import DPTrainer

    overrides = _launch_overrides(overrides)
    model = _maybe_lora(_load(model_dir, overrides.pop("load_with_tp_plan", False)), overrides)
    data = models.markov_records(256, SEQ, vocab=64, seed=1)
    args = _args(out, **overrides)
    trainer = DPTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data))
    trainer.train(resume_from_checkpoint=os.path.join(out, checkpoint))
    return {
        "log_history": trainer.state.log_history,
        "ledger": trainer.ledger(),
        "params": {k: v.clone() for k, v in models.full_params(trainer.model).items()},
    }


# --------------------------------------------------------------------------- LoRA on TP


def _lora_worker(
    rank: int,
    world: int,
    model_dir: str,
    adapter_dir: str,
    out: str,
    clip: float,
    overrides: dict | None = None,
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_dp_tp import DPTrainer

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    args = _args(out, per_sample_max_grad_norm=clip, **(overrides or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPTrainer(model=model, args=args, train_dataset=_dataset())
        trainer.train()
    trainer.save_model()
    return {"trainable": sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)}


@pytest.mark.parametrize(
    "world, overrides",
    [
        pytest.param(2, {}, id="tp2"),
        pytest.param(
            4,
            {
                "fsdp": "full_shard",
                "grad_sample_mode": "ghost",
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 2,
            },
            id="fsdp2_tp2_ghost_ga2",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_lora_on_tp_adapter_update_equals_single_process(llama_dir, tmp_path, world, overrides):
    """LoRA on all attention and MLP projections of a TP model (peft applied before sharding):
    only adapters train, their DP update equals the single-process reference, and the saved
    adapter loads with peft in one process; also with FSDP2 over DP and ghost clipping."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(
        target_modules=models.LLAMA_PROJECTIONS, r=4, lora_alpha=8, init_lora_weights=False
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64)
    initial = get_peft_model(base, config)
    adapter_dir = str(tmp_path / "adapter0")
    initial.save_pretrained(adapter_dir)

    reference = initial.train()
    batch = {k: torch.tensor(v) for k, v in _records().items()}

    def losses(m, b):
        ids = b["input_ids"]
        logits = m(input_ids=ids, position_ids=torch.arange(SEQ).expand_as(ids)).logits
        return token_mean_per_sample(logits, b["labels"])

    grads, norms = models.reference_per_sample_grads(reference, losses, batch)
    assert all("lora_" in name for name in grads)
    clip = 0.5 * norms.min().item()
    update = models.reference_dp_update(grads, norms, clip, N)
    before = {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}

    out = str(tmp_path / "out")
    results = run_distributed(_lora_worker, world, llama_dir, adapter_dir, out, clip, overrides)
    assert all("lora_" in n for n in results[0]["trainable"]) and len(results[0]["trainable"]) == 28

    fresh = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64)
    trained = PeftModel.from_pretrained(fresh, out)  # one process, the saved adapter
    params = dict(trained.named_parameters())
    worst = 0.0
    for name, old in before.items():
        want = old - update[name]
        scale = update[name].abs().max().clamp_min(1e-12)
        worst = max(worst, ((params[name].detach() - want).abs().max() / scale).item())
    print(f"LoRA tp=2: saved adapter vs reference, relative error {worst:.3g}")
    assert worst < 1e-9
