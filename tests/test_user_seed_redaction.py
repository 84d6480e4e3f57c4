"""A user-fixed ``dp_seed`` never leaves the process (one process, no TP).

Whoever knows the seed rebuilds every Poisson batch and subtracts the noise, so no
representation of ``DPTrainingArguments`` holds it — ``str``/``repr`` (what scripts log first),
``to_dict``/``to_json_string``/``to_sanitized_dict`` and pickles (``torch.save(args)``: every
``training_args.bin``) — and no file a push to the Hub uploads, at any ``hub_strategy``. The live
object keeps it for the run (and in-memory copies with it).
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import pickle
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch

from tests import models
from tests.secret_scan import blobs, holders, seed_encodings
from tests.test_privacy_integrity import USER_SEED
from tests.test_trainer import _args, _dataset

ENCODINGS = seed_encodings(USER_SEED)


def _leaks(blob: bytes) -> list[bytes]:
    return [e for e in ENCODINGS if e in blob]


def _user_seed_args(out: str, **overrides):
    return _args(
        out,
        tp_size=1,
        grad_sample_mode="hooks",
        noise_multiplier=1.0,
        dp_seed=USER_SEED,
        **overrides,
    )


def test_no_representation_of_the_arguments_holds_the_seed(tmp_path, capsys):
    import copy

    args = _user_seed_args(str(tmp_path))
    print(args)
    print(repr(args), f"{args!s}", [args])
    texts = [capsys.readouterr().out, args.to_json_string(), str(args.to_sanitized_dict())]
    assert all(str(USER_SEED) not in text for text in texts)
    assert args.to_dict()["dp_seed"] == "<redacted>"
    pickled = pickle.dumps(args)
    buffer = io.BytesIO()
    torch.save(args, buffer)
    assert not _leaks(pickled) and not _leaks(buffer.getvalue())
    # the live object, and its in-memory copies, keep it for the run
    assert args.dp_seed == copy.copy(args).dp_seed == copy.deepcopy(args).dp_seed == USER_SEED
    # unpickled arguments draw a fresh seed, and say that the fixed one was not stored
    with pytest.warns(UserWarning, match="user-fixed dp_seed, which is never stored"):
        restored = pickle.loads(pickled)
    assert restored.dp_seed is None and restored.noise_multiplier == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no seed was withheld: nothing to say
        assert pickle.loads(pickle.dumps(_args(str(tmp_path), dp_seed=None))).dp_seed is None


class _FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: every folder ``upload_folder`` is given is
    copied, as it is at that moment, under ``root/<n>``."""

    def __init__(self, root) -> None:
        self.root, self.uploads = root, []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=f"user/{os.path.basename(str(repo_id))}")

    def upload_folder(self, *, folder_path, path_in_repo=None, run_as_future=False, **kwargs):
        copy = os.path.join(self.root, str(len(self.uploads)))
        shutil.copytree(folder_path, copy)
        self.uploads.append((path_in_repo, copy))
        done = concurrent.futures.Future()
        done.set_result(SimpleNamespace(commit_url="https://hub.invalid/commit"))
        return done if run_as_future else done.result()

    def __getattr__(self, name):  # anything else the Trainer asks of the Hub: a no-op
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("strategy", ["every_save", "all_checkpoints"])
def test_no_push_to_the_hub_uploads_the_seed(tmp_path, monkeypatch, capsys, strategy):
    import transformers.trainer

    from hf_dp_tp import DPTrainer

    hub = _FakeHub(tmp_path / "hub")
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    args = _user_seed_args(
        str(tmp_path / "out"),
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        push_to_hub=True,
        hub_model_id="dp-run",
        hub_strategy=strategy,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPTrainer(model=models.tiny_causal_lm(), args=args, train_dataset=_dataset())
        trainer.train()
        trainer.push_to_hub()
    assert trainer.dp_seed == USER_SEED  # the run did use the fixed seed
    assert len(hub.uploads) >= 3  # one push per save, and the final one
    uploaded = [where for where, _ in blobs(hub.root)]
    assert sum(where.endswith("training_args.bin") for where in uploaded) >= 3
    assert holders(hub.root, ENCODINGS) == []
    assert holders(tmp_path / "out", ENCODINGS) == []
    captured = capsys.readouterr()
    assert str(USER_SEED) not in captured.out + captured.err
