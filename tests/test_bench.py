"""The benches run end to end and print one JSON object each: bench/step_time.py (one driver
call, five fresh worker launches: non-private TP, DP-TP per-sample, ghost and secure under
torchrun on 2 CPU processes, single-process opacus) and bench/noise_throughput.py (small sizes)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.distributed_harness import ROOT, run_script

CONFIGS = ("non_private_tp", "dp_tp", "dp_tp_ghost", "dp_tp_secure", "opacus_single_process")
DP_STAGES = {
    "forward",
    "backward_with_per_sample_hooks",
    "clip_and_norms",
    "noise_and_reduce",
    "optimizer_step",
}


@pytest.mark.slow
def test_step_time_driver_reports_every_field():
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "step_time.py"),
        *("--steps", "2", "--warmup", "1", "--hidden", "64", "--layers", "1"),
        "--secure_mode",
    ]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the driver's default
    out = json.loads(run_script(cmd, env=env, timeout=300))  # exactly one JSON object on stdout

    assert out["config"]["hidden"] == 64 and out["config"]["layers"] == 1
    assert out["config"]["nproc"] == out["config"]["tp_size"] * out["config"]["dp_size"] == 2
    machine = out["machine"]
    for key in ("cpu_model", "cpu_cores", "torch_version", "device"):
        assert machine[key], key
    assert out["threads"]["omp_num_threads_per_worker"] == 1
    assert out["threads"]["opacus_single_process_threads"] == 2
    assert out["opacus_single_process_skipped"] is None

    for name in CONFIGS:
        assert out[f"{name}_s"] > 0, name
        assert out[f"{name}_peak_mb"] > 0, name
        assert out[f"{name}_after_build_mb"] > 0, name
        assert out[f"{name}_peak_mb"] >= out[f"{name}_after_build_mb"] - 1, name
        assert len(out["step_times_s"][name]) == 2, name
    assert out["ratio_dp_tp_over_non_private"] == pytest.approx(
        out["dp_tp_s"] / out["non_private_tp_s"]
    )
    assert out["ratio_dp_tp_over_opacus"] == pytest.approx(
        out["dp_tp_s"] / out["opacus_single_process_s"]
    )

    assert out["ratio_secure_over_seeded"] == pytest.approx(out["dp_tp_secure_s"] / out["dp_tp_s"])
    assert set(out["dp_tp_secure_breakdown_s"]) == DP_STAGES
    assert set(out["machine"]["other_processes_cpu_cores"]) == set(CONFIGS)

    assert set(out["dp_tp_breakdown_s"]) == DP_STAGES
    assert all(v > 0 for v in out["dp_tp_breakdown_s"].values()), out["dp_tp_breakdown_s"]
    assert {"forward", "backward", "optimizer_step"} <= set(out["non_private_breakdown_s"])
    assert out["dp_tp_breakdown_extra_s"]["per_sample_hooks_within_backward"] > 0
    assert isinstance(out["overhead_note"], str) and "dominated by" in out["overhead_note"]
    assert set(out["dp_tp_ghost_breakdown_s"]) == DP_STAGES
    assert out["ratio_ghost_over_non_private"] == pytest.approx(
        out["dp_tp_ghost_s"] / out["non_private_tp_s"]
    )
    assert out["increase_ratio_ghost_over_non_private"] == pytest.approx(
        out["dp_tp_ghost_increase_mb"] / out["non_private_tp_increase_mb"]
    )
    assert out["ghost_overhead_note"].startswith("ghost ")
    # gradient memory held per rank: without FSDP the fp32 clipped sums are as large as the
    # TP-local fp32 parameters
    assert out["non_private_tp_grad_mb_per_rank"] > 0
    for name in ("dp_tp", "dp_tp_ghost"):
        assert out[f"{name}_grad_mb_per_rank"] == pytest.approx(
            out[f"{name}_param_mb_per_rank"], rel=1e-9
        ), name


def test_noise_throughput_reports_every_field():
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "noise_throughput.py"),
        *("--numel", "20000", "--legacy_numel", "2000", "--poisson_n", "50000"),
        *("--repeats", "1", "--no_cuda"),
    ]
    out = json.loads(run_script(cmd, timeout=120))
    assert out["config"]["numel"] == 20000 and out["config"]["poisson_n"] == 50000
    rates = out["normals_per_s_per_core"]
    for kind in ("seeded", "secure", "secure_chacha_torch"):
        assert set(rates[kind]) == {"float32", "float64"}
        assert all(v > 0 for v in rates[kind].values()), rates
    assert rates["legacy_secure"]["float32"] > 0
    assert out["secure_over_seeded"]["float32"] == pytest.approx(
        rates["secure"]["float32"] / rates["seeded"]["float32"]
    )
    assert set(out["poisson_mask_s"]) == {"secure", "seeded", "legacy_secure"}
    assert all(v > 0 for v in out["poisson_mask_s"].values())
    machine = out["machine"]
    assert machine["torch_num_threads"] == 1 and machine["cryptography_version"]
    assert "other_processes_cpu_cores" in machine and machine["cpu_cores"] >= 1
    assert out["normals_per_s_cuda"] is None and out["cuda_secure_over_seeded"] is None


def test_utility_bench_runs_the_example_with_one_recipe_and_sigma_zero_as_baseline():
    """bench/utility.py: every run is the example with the same recipe, differing only in the
    method and ε; the non-private baseline is σ = 0 (same batches and clipping), and
    ``recovered`` is the DP loss improvement over the baseline's at equal steps."""
    import importlib.util

    from tests.test_finetune_example import _script

    spec = importlib.util.spec_from_file_location("utility", ROOT / "bench" / "utility.py")
    utility = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utility)
    script = _script()
    parsed = {}
    for method in ("lora", "full"):
        for epsilon in ("none", "8"):
            argv = utility.command(method, epsilon, "out")[2:]  # the flags after the script
            model_args, data_args, args, run_args = script.parse_args(argv)
            parsed[method, epsilon] = (model_args, args)
            assert model_args.model_name_or_path == "smollm2"
            assert run_args.logical_batch_size == utility.RECIPE["logical_batch_size"]
            assert args.max_steps == utility.RECIPE["max_steps"]
            assert args.learning_rate == utility.RECIPE["learning_rate"][method]
            assert data_args.max_seq_length == utility.RECIPE["max_seq_length"]
            assert model_args.use_lora == (method == "lora")
            assert args.grad_sample_mode == ("ghost" if method == "full" else "tp")
    assert parsed["lora", "none"][1].noise_multiplier == 0.0
    assert parsed["lora", "none"][1].target_epsilon is None
    assert parsed["lora", "8"][1].target_epsilon == 8.0
    rows = [
        {"method": "lora", "target_epsilon": None, "eval_loss_before": 4.0, "eval_loss_after": 2.0},
        {"method": "lora", "target_epsilon": 8.0, "eval_loss_before": 4.0, "eval_loss_after": 3.0},
    ]
    assert utility.recovered(rows) == {"lora:eps=8": 0.5}
