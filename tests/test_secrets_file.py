"""The opt-in ``dp_secrets_file`` is trusted only as ssh trusts a private key (one process).

An attacker who can plant a file at that path chooses the run's Poisson batches and noise (a
seeded file with a known seed, or a secure one with a known key, predicts every mask); one who
can read it subtracts the noise. So a stored secret is used only when the file (and a symlink
leading to it) is owned by the current user and not readable or writable by group or others;
degenerate secrets (an all-zero key) are refused as well. The file the library writes itself
(mode 0600) still replays.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest

from hf_dp_tp.checkpoint import read_secrets_file, write_secrets_file

OTHER_UID = 12345
KEY = bytes(range(1, 33))  # a well-formed 32-byte key an attacker knows


def _plant(path, data: dict, mode: int) -> str:
    path = str(path)
    with open(path, "w") as f:
        json.dump(data, f)
    os.chmod(path, mode)
    return path


SEEDED = {"mode": "seeded", "seed": 42}
SECURE = {"mode": "secure", "key": KEY.hex()}


@pytest.mark.parametrize("data, secure", [(SEEDED, False), (SECURE, True)])
@pytest.mark.parametrize("mode", [0o666, 0o644, 0o640, 0o620, 0o604], ids=lambda m: f"{m:04o}")
def test_file_readable_or_writable_by_others_is_refused(tmp_path, data, secure, mode):
    path = _plant(tmp_path / "secrets.json", data, mode)
    with pytest.raises(ValueError, match=rf"mode {mode:04o}.*chmod 600 {path}.*delete it"):
        read_secrets_file(path, secure_mode=secure)


@pytest.mark.parametrize("data, secure", [(SEEDED, False), (SECURE, True)])
def test_file_owned_by_another_user_is_refused(tmp_path, data, secure):
    path = _plant(tmp_path / "secrets.json", data, 0o600)
    os.chown(path, OTHER_UID, -1)
    with pytest.raises(
        ValueError, match=rf"owned by uid {OTHER_UID}, not by you \({os.getuid()}\)"
    ):
        read_secrets_file(path, secure_mode=secure)


def test_symlink_to_a_readable_file_is_refused(tmp_path):
    target = _plant(tmp_path / "target.json", SEEDED, 0o644)
    link = tmp_path / "secrets.json"
    link.symlink_to(target)
    with pytest.raises(ValueError, match="the file it links to has mode 0644"):
        read_secrets_file(str(link), secure_mode=False)


def test_symlink_owned_by_another_user_is_refused(tmp_path):
    target = _plant(tmp_path / "target.json", SEEDED, 0o600)  # a private file of ours ...
    link = tmp_path / "secrets.json"
    link.symlink_to(target)
    os.lchown(link, OTHER_UID, -1)  # ... reached through someone else's link
    with pytest.raises(ValueError, match=f"the symlink is owned by uid {OTHER_UID}"):
        read_secrets_file(str(link), secure_mode=False)


def test_dangling_symlink_is_refused(tmp_path):
    link = tmp_path / "secrets.json"
    link.symlink_to(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="symlink to a missing file"):
        read_secrets_file(str(link), secure_mode=False)


def test_directory_is_refused(tmp_path):
    path = tmp_path / "secrets.json"
    path.mkdir(mode=0o700)
    with pytest.raises(ValueError, match="not a regular file"):
        read_secrets_file(str(path), secure_mode=False)


@pytest.mark.parametrize(
    "data, secure",
    [
        ({"mode": "secure", "key": "00" * 32}, True),
        ({"mode": "secure", "key": "ab" * 32}, True),
        ({"mode": "seeded", "seed": 0}, False),
    ],
)
def test_degenerate_secret_is_refused_even_in_a_private_file(tmp_path, data, secure):
    path = _plant(tmp_path / "secrets.json", data, 0o600)
    with pytest.raises(ValueError, match="degenerate.*Delete it"):
        read_secrets_file(path, secure_mode=secure)


@pytest.mark.parametrize("secret", [8734512987123457, os.urandom(32)])
def test_file_written_by_the_library_replays(tmp_path, secret):
    path = str(tmp_path / "private" / "secrets.json")
    assert read_secrets_file(path, secure_mode=isinstance(secret, bytes)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_secrets_file(path, secret)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert read_secrets_file(path, secure_mode=isinstance(secret, bytes)) == secret
    link = tmp_path / "link.json"  # our own symlink to our own private file is fine
    link.symlink_to(path)
    assert read_secrets_file(str(link), secure_mode=isinstance(secret, bytes)) == secret


def test_dp_trainer_refuses_a_planted_secrets_file(tmp_path):
    """The trainer reads the file through :func:`read_secrets_file`: a planted world-writable
    seed is refused when the trainer is built, before any batch is drawn."""
    from hf_dp_tp import DPTrainer
    from tests import models
    from tests.test_trainer import _args, _dataset

    path = _plant(tmp_path / "secrets.json", SEEDED, 0o666)
    args = _args(
        str(tmp_path / "out"),
        tp_size=1,
        grad_sample_mode="hooks",
        noise_multiplier=1.0,
        dp_seed=None,
        dp_secrets_file=path,
    )
    with pytest.raises(ValueError, match="refusing to use dp_secrets_file"):
        DPTrainer(model=models.tiny_causal_lm(), args=args, train_dataset=_dataset())
