"""DPTrainer refuses bad input early and clearly, exposes its arguments on the command line,
stops before exceeding the budget, and runs in one process without TP ("hooks" mode)."""

from __future__ import annotations

import os
import re
import time
import warnings

import pytest
import torch
from torch import nn

from tests import models
from tests.distributed_harness import run_distributed
from tests.test_trainer import _args, _dataset


# --------------------------------------------------------------------------- arguments
def test_privacy_arguments_are_validated():
    from hf_dp_tp import DPTrainingArguments

    base = dict(output_dir="/tmp/unused", report_to=[])
    with pytest.raises(ValueError, match="exactly one of target_epsilon"):
        DPTrainingArguments(**base)
    with pytest.raises(ValueError, match="exactly one of target_epsilon"):
        DPTrainingArguments(**base, target_epsilon=3.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="accountant must be one of"):
        DPTrainingArguments(**base, noise_multiplier=1.0, accountant="moments")
    with pytest.raises(ValueError, match="grad_sample_mode must be one of"):
        DPTrainingArguments(**base, noise_multiplier=1.0, grad_sample_mode="functorch")
    with pytest.raises(ValueError, match="needs grad_sample_mode='tp'"):
        DPTrainingArguments(**base, noise_multiplier=1.0, tp_size=2, grad_sample_mode="hooks")
    with pytest.raises(ValueError, match="supports fsdp='full_shard'.*'hybrid_shard'"):
        DPTrainingArguments(**base, noise_multiplier=1.0, fsdp="full_shard offload")
    with pytest.raises(ValueError, match="supports fsdp='full_shard'"):
        DPTrainingArguments(**base, noise_multiplier=1.0, fsdp="shard_grad_op")
    with pytest.raises(ValueError, match="use grad_sample_mode='tp' or 'ghost', not 'hooks'"):
        DPTrainingArguments(
            **base, noise_multiplier=1.0, fsdp="full_shard", grad_sample_mode="hooks"
        )
    fsdp = DPTrainingArguments(**base, noise_multiplier=1.0, fsdp="full_shard")
    assert fsdp.dp_fully_shard and not fsdp.fsdp  # DPTrainer's FSDP2, not accelerate's plugin
    assert fsdp.dp_replicate_size == 1
    hybrid = DPTrainingArguments(**base, noise_multiplier=1.0, fsdp="hybrid_shard auto_wrap")
    assert hybrid.dp_fully_shard and hybrid.dp_replicate_size is None  # one replica per node

    with pytest.raises(ValueError, match="poisson_sampling=False is not supported"):
        DPTrainingArguments(**base, noise_multiplier=1.0, poisson_sampling=False)
    with pytest.raises(ValueError, match="target_delta must be in"):
        DPTrainingArguments(**base, noise_multiplier=1.0, target_delta=1.5)
    with pytest.raises(ValueError, match="per_sample_max_grad_norm must be"):
        DPTrainingArguments(**base, noise_multiplier=1.0, per_sample_max_grad_norm=0.0)
    with pytest.raises(ValueError, match="fp16=True is not supported.*bf16"):
        DPTrainingArguments(**base, noise_multiplier=1.0, fp16=True)
    with pytest.warns(UserWarning, match="max_grad_norm=1.0 is ignored"):
        args = DPTrainingArguments(**base, noise_multiplier=1.0, max_grad_norm=1.0)
    assert args.max_grad_norm == 0.0 and not args.average_tokens_across_devices


def test_an_untokenised_dataset_is_refused_up_front_with_tokenise_first():
    """Text-only records would reach Trainer's column pruning at the first step, whose hint
    (remove_unused_columns=False) does not help; DPTrainer refuses them at construction."""
    import datasets
    from torch import nn

    from hf_dp_tp import DPTrainer, DPTrainingArguments

    args = DPTrainingArguments(output_dir="/tmp/unused", report_to=[], noise_multiplier=1.0)
    text = datasets.Dataset.from_dict({"text": ["a note", "another note"], "id": ["1", "2"]})
    with pytest.raises(ValueError, match=r"only text columns \['text', 'id'\].*tokenise it first"):
        DPTrainer(model=nn.Linear(2, 2), args=args, train_dataset=text)

    from hf_dp_tp.dataset_checks import check_tokenised

    tokenised = text.add_column("input_ids", [[1, 2], [3]])
    check_tokenised(tokenised, data_collator=None, per_sample_loss=None)  # has input_ids
    check_tokenised(text, data_collator=lambda rows: rows, per_sample_loss=None)  # may tokenise
    check_tokenised(text, data_collator=None, per_sample_loss=lambda m, b: b)  # takes raw text
    check_tokenised([{"text": "x"}], data_collator=None, per_sample_loss=None)  # not checked


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("inf")])
def test_a_target_epsilon_out_of_range_says_what_epsilon_means(epsilon):
    from hf_dp_tp import DPTrainingArguments

    with pytest.raises(ValueError) as info:
        DPTrainingArguments(output_dir="/tmp/unused", report_to=[], target_epsilon=epsilon)
    message = str(info.value)
    assert "target_epsilon must be a positive finite number" in message
    assert "one training record" in message and "Typical values" in message
    assert "noise_multiplier" in message  # the way to train without a budget


def test_parallelism_config_sets_the_mesh_or_is_refused():
    from accelerate import ParallelismConfig

    from hf_dp_tp import DPTrainingArguments

    base = dict(output_dir="/tmp/unused", report_to=[], noise_multiplier=1.0)
    config = ParallelismConfig(dp_replicate_size=2, dp_shard_size=2, tp_size=2)
    args = DPTrainingArguments(**base, parallelism_config=config)
    assert (args.tp_size, args.dp_fully_shard, args.dp_replicate_size, args.dp_mesh_size) == (
        2,
        True,
        2,
        4,
    )
    assert args.parallelism_config is None  # accelerate never sees it
    replicated = DPTrainingArguments(
        **base, parallelism_config=ParallelismConfig(dp_replicate_size=2, tp_size=2)
    )
    assert not replicated.dp_fully_shard and replicated.dp_mesh_size == 2
    with pytest.raises(ValueError, match="context / sequence parallelism is not supported"):
        DPTrainingArguments(**base, parallelism_config=ParallelismConfig(cp_size=2))
    with pytest.raises(ValueError, match="give the TP degree once"):
        DPTrainingArguments(**base, tp_size=4, parallelism_config=config)
    with pytest.raises(ValueError, match="not both"):
        DPTrainingArguments(**base, fsdp="full_shard", parallelism_config=config)
    with pytest.raises(ValueError, match="not 'hooks'"):
        DPTrainingArguments(
            **base,
            grad_sample_mode="hooks",
            parallelism_config=ParallelismConfig(dp_shard_size=2),
        )


def test_accelerate_launch_fsdp_and_parallelism_configs_are_taken_over(monkeypatch):
    """``accelerate launch`` with an FSDP2 or a parallelism config (environment variables)
    becomes DPTrainer's own FSDP; accelerate's switches are turned off (its FSDP plugin would
    reduce the non-private gradients); FSDP1, offload and ZeRO-2 are refused."""
    from hf_dp_tp import DPTrainingArguments
    from hf_dp_tp.parallel import release_accelerate_sharding

    base = dict(output_dir="/tmp/unused", report_to=[], noise_multiplier=1.0)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    args = DPTrainingArguments(**base)
    assert args.dp_fully_shard and args.dp_replicate_size == 1 and not args.fsdp
    release_accelerate_sharding()  # what DPTrainer.__init__ does first (the arguments only read)
    assert os.environ["ACCELERATE_USE_FSDP"] == "false"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD")
    args = DPTrainingArguments(**base)
    assert args.dp_fully_shard and args.dp_replicate_size is None  # one replica per node
    for name, value, why in [
        ("FSDP_VERSION", "1", "FSDP2 only"),
        ("FSDP_OFFLOAD_PARAMS", "true", "offloads parameters"),
        ("FSDP_RESHARD_AFTER_FORWARD", "false", "full \\(or hybrid\\) sharding only"),
    ]:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(ValueError, match=why):
                DPTrainingArguments(**base)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")

    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_SHARD_SIZE", "2")
    monkeypatch.setenv("PARALLELISM_CONFIG_TP_SIZE", "2")
    args = DPTrainingArguments(**base)
    assert (args.tp_size, args.dp_fully_shard, args.dp_replicate_size, args.dp_mesh_size) == (
        2,
        True,
        1,
        2,
    )
    release_accelerate_sharding()
    assert os.environ["ACCELERATE_USE_PARALLELISM_CONFIG"] == "false"


@pytest.mark.parametrize(
    "setting, value, why",
    [
        ("max_grad_norm", 1.0, r"clipped per sample at per_sample_max_grad_norm"),
        ("dataloader_drop_last", True, r"no Poisson batch is ever dropped"),
        ("train_sampling_strategy", "group_by_length", r"Poisson sampling decides the training"),
        ("data_seed", 7, r"Poisson sampling decides the training batches, from dp_seed"),
    ],
)
def test_ignored_trainer_settings_warn_once_at_the_user_line(setting, value, why):
    """Each ignored setting is named with the reason, once, at the line that built the
    arguments (directly or through HfArgumentParser), never at a dataclass's ``<string>``."""
    from transformers import HfArgumentParser

    from hf_dp_tp import DPTrainingArguments

    base = dict(output_dir="/tmp/unused", report_to=[], noise_multiplier=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DPTrainingArguments(**base, **{setting: value})
    mine = [w for w in caught if f"{setting}={value!r} is ignored" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert re.search(why, str(mine[0].message)), mine[0].message
    assert mine[0].filename == __file__, mine[0].filename
    flags = ["--output_dir", "/tmp/unused", "--noise_multiplier", "1", f"--{setting}", str(value)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HfArgumentParser(DPTrainingArguments).parse_args_into_dataclasses(flags)
    mine = [w for w in caught if f"{setting}=" in str(w.message)]
    assert len(mine) == 1 and mine[0].filename == __file__, [(w.filename, w.lineno) for w in mine]
    with warnings.catch_warnings(record=True) as caught:  # the defaults: silent
        warnings.simplefilter("always")
        DPTrainingArguments(**base)
    assert not [w for w in caught if "is ignored by DPTrainer" in str(w.message)]


def test_hf_argument_parser_exposes_privacy_fields():
    from transformers import HfArgumentParser

    from hf_dp_tp import DPTrainingArguments

    parser = HfArgumentParser(DPTrainingArguments)
    help_text = parser.format_help()
    for flag in (
        "--target_epsilon",
        "--noise_multiplier",
        "--per_sample_max_grad_norm",
        "--tp_size",
    ):
        assert flag in help_text
    assert "Privacy budget" in help_text
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "/tmp/x", "--target_epsilon", "4", "--tp_size", "2", "--accountant", "rdp"]
    )
    assert args.target_epsilon == 4.0 and args.tp_size == 2 and args.accountant == "rdp"
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "/tmp/x", "--noise_multiplier", "1", "--tp_plan", "none"]
    )
    assert args.tp_plan is None


def test_dict_plan_with_torch_styles_serialises_for_loggers():
    import json

    from torch.distributed.tensor.parallel import ColwiseParallel

    from hf_dp_tp import DPTrainingArguments

    plan = {"model.layers.*.mlp.up_proj": ColwiseParallel(), "lm_head": "colwise_gather_output"}
    args = DPTrainingArguments(
        output_dir="/tmp/x", noise_multiplier=1.0, tp_plan=plan, report_to=[]
    )
    logged = json.loads(args.to_json_string())["tp_plan"]
    assert logged["lm_head"] == "colwise_gather_output"
    assert "ColwiseParallel" in logged["model.layers.*.mlp.up_proj"]
    assert args.tp_plan is plan  # the live plan is untouched


def test_auto_find_batch_size_is_refused():
    """An OOM restart would redraw the batches and change B̄ and q mid-run: refused up front."""
    from hf_dp_tp import DPTrainingArguments

    with pytest.raises(
        ValueError,
        match=r"auto_find_batch_size=True is not supported.*per_device_train_batch_size "
        r"explicitly.*gradient_accumulation_steps",
    ):
        DPTrainingArguments(
            output_dir="/tmp/unused", report_to=[], noise_multiplier=1.0, auto_find_batch_size=True
        )


def test_approximate_accountant_needs_an_acknowledgement():
    """'gdp' can under-report ε: refused everywhere an accountant is chosen unless
    allow_approximate_accountant=True; with it, its ε is marked approximate."""
    from hf_dp_tp import (
        DPTrainingArguments,
        PrivacyEngineGradSampleController,
        calibrate_noise_multiplier,
        make_accountant,
    )
    from hf_dp_tp.privacy_plan import PrivacyPlan

    refused = r"accountant='gdp'.*BELOW the true privacy loss.*allow_approximate_accountant=True"
    base = dict(output_dir="/tmp/unused", report_to=[], noise_multiplier=1.0)
    with pytest.raises(ValueError, match=refused):
        DPTrainingArguments(**base, accountant="gdp")
    with pytest.raises(ValueError, match=refused):
        PrivacyEngineGradSampleController(accountant="gdp")
    with pytest.raises(ValueError, match=refused):
        make_accountant("gdp")
    budget = dict(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.01, steps=10)
    with pytest.raises(ValueError, match=refused):
        calibrate_noise_multiplier(**budget, accountant="gdp")
    with pytest.raises(ValueError, match=refused):
        PrivacyPlan(
            dataset_size=100,
            expected_batch_size=10,
            accountant_name="gdp",
            noise_multiplier=1.0,
        )

    with pytest.warns(UserWarning, match="understate"):
        args = DPTrainingArguments(**base, accountant="gdp", allow_approximate_accountant=True)
        engine = PrivacyEngineGradSampleController(
            accountant="gdp", allow_approximate_accountant=True
        )
        calibrate_noise_multiplier(**budget, accountant="gdp", allow_approximate_accountant=True)
    assert args.allow_approximate_accountant and not engine.epsilon_is_upper_bound
    assert PrivacyEngineGradSampleController(accountant="prv").epsilon_is_upper_bound

    def plan(name: str, **kwargs) -> PrivacyPlan:
        plan = PrivacyPlan(
            dataset_size=100,
            expected_batch_size=10,
            accountant_name=name,
            noise_multiplier=1.0,
            **kwargs,
        )
        plan.step()
        return plan

    with pytest.warns(UserWarning, match="understate"):
        gdp = plan("gdp", allow_approximate_accountant=True)
        report, ledger = gdp.report(), gdp.ledger(global_step=1, optimizer_state=None)
    assert report["epsilon_is_upper_bound"] is False
    assert report["accountant_kind"] == "approximate (may under-report)"
    assert ledger["accountant"]["epsilon_is_upper_bound"] is False
    assert ledger["accountant"]["accountant_kind"] == "approximate (may under-report)"
    for name in ("prv", "rdp"):
        report = plan(name).report()
        assert report["epsilon_is_upper_bound"] is True, name
        assert report["accountant_kind"] == "upper bound"
        ledger = plan(name).ledger(global_step=1, optimizer_state=None)
        assert ledger["accountant"]["epsilon_is_upper_bound"] is True


def test_approximate_accountant_epsilon_is_marked_in_logs_and_report(tmp_path):
    """A DPTrainer run with accountant='gdp' (acknowledged): every log record with ε, the
    checkpoint's ledger and privacy_report.json say that ε is approximate."""
    import json

    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_dp_tp import DPTrainer

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    config.bos_token_id = config.eos_token_id = 0
    args = _args(
        str(tmp_path),
        tp_size=1,
        grad_sample_mode="hooks",
        noise_multiplier=1.0,
        max_steps=1,
        accountant="gdp",
        allow_approximate_accountant=True,
        save_strategy="steps",
        save_steps=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPTrainer(model=GPT2LMHeadModel(config), args=args, train_dataset=_dataset())
        trainer.train()
    logged = [h for h in trainer.state.log_history if "epsilon" in h]
    assert logged and all(h["epsilon_is_upper_bound"] is False for h in logged)
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["accountant"] == "gdp" and report["epsilon_is_upper_bound"] is False
    assert report["accountant_kind"] == "approximate (may under-report)"
    ledger = json.loads((tmp_path / "checkpoint-1" / "dp_ledger.json").read_text())
    assert ledger["accountant"]["epsilon_is_upper_bound"] is False


# --------------------------------------------------------------------------- one process
def test_single_process_hooks_mode_gpt2_trains(tmp_path):
    """No torchrun, no TP: GPT-2 (Conv1D, tied embeddings) with grad_sample_mode='hooks'."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_dp_tp import DPTrainer

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    config.bos_token_id = config.eos_token_id = 0
    model = GPT2LMHeadModel(config)
    args = _args(
        str(tmp_path), tp_size=1, grad_sample_mode="hooks", noise_multiplier=1.0, max_steps=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPTrainer(model=model, args=args, train_dataset=_dataset())
        trainer.train()
    assert trainer.state.global_step == 2
    assert 0 < trainer.get_epsilon() < float("inf")
    assert os.path.isfile(tmp_path / "privacy_report.json")


# --------------------------------------------------------------------------- distributed
def _errors_worker(rank: int, world: int, model_dir: str, out: str) -> dict[str, str]:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from hf_dp_tp import DPTrainer, UnsupportedLayoutError

    results: dict[str, str] = {}

    def expect(name, exc, fn):
        try:
            fn()
        except exc as err:
            results[name] = str(err)
        else:
            results[name] = "NO ERROR"

    def trainer(model, **overrides):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DPTrainer(model=model, args=_args(out, **overrides), train_dataset=_dataset())

    llama = lambda: models.load_tiny_llama(model_dir)  # noqa: E731
    expect("tp_not_dividing_world", ValueError, lambda: trainer(llama(), tp_size=3))
    three_heads = LlamaConfig(
        vocab_size=64,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_key_value_heads=3,
    )
    expect("heads_not_divisible", ValueError, lambda: trainer(LlamaForCausalLM(three_heads)))
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    )
    expect("auto_plan_without_hf_plan", ValueError, lambda: trainer(gpt2))

    sharded = llama()
    from hf_dp_tp import init_dp_tp_mesh
    from hf_dp_tp.parallel import apply_tp_plan

    apply_tp_plan(sharded, init_dp_tp_mesh(2)["tp"], "auto")
    expect(
        "dtensor_model_in_hooks_mode",
        ValueError,
        lambda: trainer(sharded, tp_size=1, grad_sample_mode="hooks", tp_plan=None),
    )
    expect("tp_plan_none_unsharded", ValueError, lambda: trainer(llama(), tp_plan=None))
    from accelerate import ParallelismConfig

    four_ranks = ParallelismConfig(dp_shard_size=2, tp_size=2)
    expect(
        "parallelism_config_not_the_world",
        ValueError,
        lambda: trainer(llama(), tp_size=1, parallelism_config=four_ranks),
    )

    with_conv = llama()
    with_conv.extra = nn.Conv1d(2, 2, 1)
    expect("unsupported_layer", UnsupportedLayoutError, lambda: trainer(with_conv))

    too_big = lambda: trainer(llama(), per_device_train_batch_size=64)  # noqa: E731
    expect("batch_larger_than_dataset", ValueError, lambda: too_big().train())

    no_ledger = os.path.join(out, "checkpoint-no-ledger")
    os.makedirs(no_ledger, exist_ok=True)
    expect(
        "resume_without_ledger",
        ValueError,
        lambda: trainer(llama()).train(resume_from_checkpoint=no_ledger),
    )

    # TP peers fed different batches (a loader re-sharded across TP ranks) must be caught
    class ReshardedTrainer(DPTrainer):
        def get_train_dataloader(self):
            loader = super().get_train_dataloader()
            return [
                {k: v[rank::world] for k, v in batch.items()} for batch in loader
            ]  # each TP rank a different slice

    def resharded():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ReshardedTrainer(model=llama(), args=_args(out), train_dataset=_dataset()).train()

    expect("tp_peers_different_batches", RuntimeError, resharded)

    # budget: σ calibrated for 3 steps; asked to run 8, it stops before exceeding the target
    budget = trainer(llama(), noise_multiplier=None, target_epsilon=3.0, max_steps=3)
    budget._resolve_noise_multiplier()
    budget.args.max_steps = 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        budget.train()
    results["budget_steps"] = str(budget.state.global_step)
    results["budget_epsilon"] = repr(budget.get_epsilon())

    # ddp_timeout bounds DPTrainer's collectives: on its TP group and on the default group, a
    # peer that stops responding (rank 1 sleeps) fails rank 0 after ~ddp_timeout seconds (last:
    # it changes the default group's timeout)
    timed = trainer(llama(), ddp_timeout=1)
    if rank == 0:
        for name, group in (("tp", timed.mesh_info.tp_group), ("world", None)):
            start = time.monotonic()
            try:
                dist_all_reduce(torch.ones(1), group)
                results[f"timeout_{name}"] = "NO ERROR"
            except RuntimeError as err:
                results[f"timeout_{name}"] = f"{time.monotonic() - start:.1f}s {err}"
    else:
        time.sleep(6)  # a stopped peer: alive, never joining
    return results


def dist_all_reduce(tensor, group):
    import torch.distributed as dist

    dist.all_reduce(tensor, group=group)


@pytest.fixture(scope="module")
def error_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_errors")
    model_dir = models.save_tiny_llama(str(root / "model"))
    return run_distributed(_errors_worker, 2, model_dir, str(root / "out"))


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("tp_not_dividing_world", r"tp_size=3 must divide the world size 2"),
        ("heads_not_divisible", r"num_attention_heads=3 is not divisible by tp_size=2"),
        ("auto_plan_without_hf_plan", r"has no HF tp_plan.*gpt2_tp_plan\(\)"),
        (
            "dtensor_model_in_hooks_mode",
            r"DTensor.*grad_sample_mode='hooks'.*Use grad_sample_mode='tp'",
        ),
        ("tp_plan_none_unsharded", r"tp_plan=None, but the model is not parallelized"),
        ("parallelism_config_not_the_world", r"covers .* = 4 ranks but the launch has 2"),
        ("unsupported_layer", r"module 'extra' \(Conv1d\).*no per-sample gradient rule"),
        ("batch_larger_than_dataset", r"exceeds the 8 training records"),
        ("resume_without_ledger", r"no privacy ledger"),
        ("tp_peers_different_batches", r"TP peers received different batches"),
    ],
)
def test_bad_input_errors(error_results, name, pattern):
    import re

    for rank_results in error_results:
        assert re.search(pattern, rank_results[name], re.S), (name, rank_results[name])


def test_ddp_timeout_bounds_dptrainer_collectives(error_results):
    """A peer that stops responding fails the others after ddp_timeout (1 s here), on the TP
    group DPTrainer builds and on the default group, instead of the 30-minute torch default."""
    for name in ("timeout_tp", "timeout_world"):
        seconds, _, message = error_results[0][name].partition("s ")
        assert message and float(seconds) < 4.5, error_results[0][name]
        assert re.search(r"[Tt]imed? ?out", message), message


def test_training_stops_before_the_budget_is_exceeded(error_results):
    for r in error_results:
        assert r["budget_steps"] == "3", r
        assert 2.9 < float(r["budget_epsilon"]) <= 3.0, r


def _empty_batches_worker(rank: int, world: int, model_dir: str, out: str) -> dict:
    from datasets import Dataset

    from hf_dp_tp import DPTrainer

    data = Dataset.from_dict(models.markov_records(32, 8, vocab=64, seed=2))
    args = _args(
        out,
        noise_multiplier=1.0,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=10,
        optim="adamw_torch",
        learning_rate=1e-3,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPTrainer(model=models.load_tiny_llama(model_dir), args=args, train_dataset=data)
        trainer.train()
        metrics = trainer.evaluate(eval_dataset=data.select(range(8)))
        predictions = trainer.predict(data.select(range(8))).predictions
    sampler = trainer._batch_sampler
    sizes = [len(b) for s in range(10) for b in sampler.micro_batches(0, s)]
    return {
        "steps": trainer.state.global_step,
        "empty_micro_batches": sizes.count(0),
        "eval_loss": metrics["eval_loss"],
        "prediction_rows": int(predictions.shape[0]),
        "epsilon": trainer.get_epsilon(),
    }


def test_empty_poisson_batches_do_not_hang_and_eval_runs(tmp_path):
    """q = 2/32 with micro-batches of expected size 1: many micro-batches (and some logical
    batches) are empty; every rank still steps, ε counts every step, evaluation runs on TP."""
    model_dir = models.save_tiny_llama(str(tmp_path / "model"))
    r0, r1 = run_distributed(_empty_batches_worker, 2, model_dir, str(tmp_path / "out"))
    print("empty micro-batches:", r0["empty_micro_batches"], "eval:", r0["eval_loss"])
    assert r0["steps"] == r1["steps"] == 10
    assert r0["empty_micro_batches"] > 0
    assert r0["eval_loss"] == r1["eval_loss"] and r0["eval_loss"] < 10
    assert r0["prediction_rows"] == r1["prediction_rows"] == 8  # not duplicated per rank
    assert r0["epsilon"] == r1["epsilon"] > 0


def test_mode_and_accountant_choices_are_offered_on_the_command_line(capsys):
    from transformers import HfArgumentParser

    from hf_dp_tp import DPTrainingArguments

    parser = HfArgumentParser(DPTrainingArguments)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(
            ["--output_dir", "/tmp/unused", "--noise_multiplier", "1", "--grad_sample_mode", "x"]
        )
    err = capsys.readouterr().err
    assert "invalid choice: 'x' (choose from 'tp', 'hooks', 'ghost')" in err
    assert "--accountant {prv,rdp,gdp}" in err
