"""``PrivacyEngineGradSampleController``: the Opacus-style entry point for a custom training loop.

It ties together the grad-sample controller (hooks on the unwrapped model), the DP optimizer
(clip / noise / reduce), the Poisson data loader for the ``(dp, tp)`` mesh and an opacus
accountant, and returns them to the caller.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .accounting import epsilon_is_upper_bound, epsilon_spent, make_accountant
from .controller import GradSampleControllerTP
from .layout import model_layout
from .optimizer import DPOptimizerTP
from .parallel import resolve_mesh
from .privacy_plan import PrivacyPlan
from .sampling import DistributedPoissonBatchSampler, build_poisson_data_loader


class PrivacyEngineGradSampleController:
    """Make a (tensor-parallel) model, its optimizer and its data loader differentially private.

    Args:
        accountant: ``"prv"`` (default) or ``"rdp"``, upper bounds on ε; ``"gdp"``, a
            central-limit approximation that can under-report ε, is refused unless
            ``allow_approximate_accountant=True`` (then :attr:`epsilon_is_upper_bound` is False).
        secure_mode: noise from AES-256-CTR keystreams under fresh ``os.urandom`` keys (one per
            step and rank, never stored) and Poisson masks from a keyed PRF with a secret key.

    Typical use, launched with ``torchrun``::

        engine = PrivacyEngineGradSampleController(accountant="prv")
        controller, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="tp", device_mesh=mesh)
        for batch in loader:
            loss = per_sample_losses(model, batch).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        engine.get_epsilon(delta=1e-5)
    """

    def __init__(
        self,
        *,
        accountant: str = "prv",
        secure_mode: bool = False,
        allow_approximate_accountant: bool = False,
    ) -> None:
        self.accountant = make_accountant(
            accountant, allow_approximate_accountant=allow_approximate_accountant
        )
        self.accountant_name = accountant
        self.allow_approximate_accountant = allow_approximate_accountant
        self.secure_mode = secure_mode
        self.privacy_plan: PrivacyPlan | None = None
        self.controller: GradSampleControllerTP | None = None
        self.optimizer: DPOptimizerTP | None = None
        self.batch_sampler: DistributedPoissonBatchSampler | None = None

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        grad_sample_mode: str = "tp",
        poisson_sampling: bool = True,
        device_mesh: DeviceMesh | None = None,
        loss_reduction: str = "mean",
        num_micro_batches: int = 1,
        noise_seed: int | None = None,
        sampling_seed: int | None = None,
    ) -> tuple[GradSampleControllerTP, DPOptimizerTP, DataLoader]:
        """Attach the controller, wrap the optimizer, rebuild the data loader.

        ``data_loader.batch_size`` is the expected logical batch *per DP rank*; the expected
        global logical batch is ``batch_size × dp_size`` and the sampling rate
        ``q = batch_size × dp_size / len(dataset)``. With ``num_micro_batches = k`` each logical
        batch is yielded as k micro-batches: call ``optimizer.clip_and_accumulate()`` after the
        backward of each of the first k-1 and ``optimizer.step()`` after the k-th.
        """
        layout = model_layout(module, grad_sample_mode, device_mesh)
        if self.secure_mode and (noise_seed is not None or sampling_seed is not None):
            raise ValueError("secure_mode draws its randomness from the OS: do not pass seeds.")
        if not isinstance(num_micro_batches, int) or num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be a positive int, got {num_micro_batches}")
        mesh = resolve_mesh(module, device_mesh, tp=layout.tp)
        plan = self.privacy_plan = self._plan(data_loader, mesh.dp_size, noise_multiplier)
        if poisson_sampling:
            data_loader = build_poisson_data_loader(
                data_loader,
                sample_rate=self.sample_rate,
                dp_rank=mesh.dp_rank,
                dp_size=mesh.dp_size,
                num_micro_batches=num_micro_batches,
                seed=sampling_seed,
                secure_mode=self.secure_mode,
            )
            self.batch_sampler = data_loader.batch_sampler
        else:
            warnings.warn(
                "poisson_sampling=False: the accountant assumes Poisson sampling, so the reported "
                "epsilon is not a proven guarantee for fixed-size batches.",
                stacklevel=2,
            )
        dp_optimizer = DPOptimizerTP(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=plan.expected_batch_size,
            mesh=mesh,
            loss_reduction=loss_reduction,
            noise_seed=noise_seed,
            secure_mode=self.secure_mode,
        )
        # attached last: a rejected argument above leaves the user's model without hooks
        controller = GradSampleControllerTP(
            module,
            device_mesh=device_mesh,
            mesh_info=mesh,
            loss_reduction=loss_reduction,
            grad_sample_mode=grad_sample_mode,
        )
        dp_optimizer.attach_step_hook(lambda opt: plan.step(opt.noise_multiplier))
        self.controller, self.optimizer = controller, dp_optimizer
        return controller, dp_optimizer, data_loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        max_grad_norm: float,
        epochs: int | None = None,
        steps: int | None = None,
        **kwargs: Any,
    ) -> tuple[GradSampleControllerTP, DPOptimizerTP, DataLoader]:
        """As :meth:`make_private`, with σ calibrated so that ``epochs`` epochs (or ``steps``
        optimizer steps) spend exactly ``target_epsilon`` at ``target_delta``."""
        if (epochs is None) == (steps is None):
            raise ValueError("give exactly one of epochs or steps")
        layout = model_layout(
            module, kwargs.get("grad_sample_mode", "tp"), kwargs.get("device_mesh")
        )
        mesh_probe = resolve_mesh(module, kwargs.get("device_mesh"), tp=layout.tp)
        plan = self._plan(
            data_loader,
            mesh_probe.dp_size,
            target_epsilon=target_epsilon,
            target_delta=target_delta,
        )
        if steps is None:
            steps = plan.planned_steps(epochs=epochs)
        sigma = plan.resolve_noise_multiplier(steps)
        return self.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            **kwargs,
        )

    @property
    def sample_rate(self) -> float | None:
        """q, the global Poisson rate (None before :meth:`make_private`)."""
        return None if self.privacy_plan is None else self.privacy_plan.sample_rate

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (identical on every rank); an approximation that may be
        below the true loss when :attr:`epsilon_is_upper_bound` is False."""
        return epsilon_spent(self.accountant, delta)

    @property
    def epsilon_is_upper_bound(self) -> bool:
        """Whether :meth:`get_epsilon` is a proven upper bound (False for ``"gdp"``)."""
        return epsilon_is_upper_bound(self.accountant_name)

    def _plan(
        self,
        data_loader: DataLoader,
        dp_size: int,
        noise_multiplier: float | None = None,
        **budget: Any,
    ) -> PrivacyPlan:
        """The privacy plan of ``data_loader``: its ``batch_size`` is the expected logical batch
        per DP rank, so ``B̄ = batch_size × dp_size`` and ``q = B̄ / len(dataset)``."""
        if data_loader.batch_size is None:
            raise ValueError(
                "the data loader must have a batch_size (the expected per-DP-rank logical batch); "
                "loaders built from a custom batch_sampler are not supported."
            )
        return PrivacyPlan(
            dataset_size=len(data_loader.dataset),
            expected_batch_size=data_loader.batch_size * dp_size,
            accountant_name=self.accountant_name,
            noise_multiplier=noise_multiplier,
            accountant=self.accountant,
            allow_approximate_accountant=self.allow_approximate_accountant,
            **budget,
        )

    # ------------------------------------------------------------------ privacy ledger
    def state_dict(self) -> dict[str, Any]:
        """Accountant history, sampler position and noise step: save it with every checkpoint.
        It holds no seed or key (the sampler's and the noise's secrets rebuild every batch and
        every noise draw); a resumed run continues ε and the position with fresh randomness."""
        return {
            "accountant": self.accountant.state_dict(),
            "sample_rate": self.sample_rate,
            "sampler": self.batch_sampler.state_dict() if self.batch_sampler else None,
            "optimizer": self.optimizer.dp_state_dict() if self.optimizer else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        if self.batch_sampler is not None and state.get("sampler") is not None:
            self.batch_sampler.load_state_dict(state["sampler"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_dp_state_dict(state["optimizer"])
