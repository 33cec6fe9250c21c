"""Runs DP trainings on 1 or 2 CPU processes (gloo); each rank writes what it saw as JSON.

Used by test_ddp.py through a subprocess: Lightning's launcher re-runs this script for rank 1.
    python tests/ddp_worker.py SCENARIO[,SCENARIO...] DEVICES OUTDIR

A scenario is a mode with an optional variant, ``mode@variant``: ``@bk``/``@hooks``/``@ghost`` pick the
engine (``auto`` otherwise), ``exact@buckets`` all-reduces in buckets of about 100 bytes,
``batchnorm_train@frozen`` freezes the BatchNorm it leaves in train mode. Several scenarios
run one after the other in the same processes, each with its own Trainer and seed: starting two
interpreters and a process group costs more than these trainings.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scenarios import split_scenario  # noqa: E402

from lightning_autodp import BatchNormModeError, DPAutoStrategy, RunTimeChecks  # noqa: E402


class Recorder(L.Callback):
    """Keeps the gradient the optimizer sees at every step."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for p in pl_module.parameters() if p.requires_grad]  # a frozen BatchNorm has none
        self.grads.append(torch.cat([p.grad.flatten() for p in params]).tolist())


class Model(L.LightningModule):
    def __init__(self, zero_gradient: bool = False, hidden: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))
        self.zero_gradient = zero_gradient

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return 0.0 * loss if self.zero_gradient else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class BatchNormModel(Model):
    """Linear, BatchNorm1d (pretrained-like running statistics, trainable affine), Tanh, Linear.

    The BatchNorm is in eval mode (it applies its running statistics) unless ``train_mode``.
    """

    def __init__(self, train_mode: bool = False, frozen: bool = False):
        super().__init__()
        torch.manual_seed(0)
        bn = nn.BatchNorm1d(8)
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(8))
            bn.running_var.copy_(torch.rand(8) * 1.5 + 0.5)  # in [0.5, 2]
            bn.weight.copy_(torch.rand(8) + 0.5)
            bn.bias.copy_(torch.randn(8))
        bn.train(train_mode)
        bn.requires_grad_(not frozen)
        self.net = nn.Sequential(nn.Linear(6, 8), bn, nn.Tanh(), nn.Linear(8, 3))

    def batch_norm_state(self) -> list[list[float]]:
        bn = self.net[1]
        return [bn.running_mean.tolist(), bn.running_var.tolist(), [float(bn.num_batches_tracked)]]


def write(outdir: str, scenario: str, devices: int, rank: int, out: dict) -> None:
    name = os.path.join(outdir, f"{scenario}-{devices}-rank{rank}.json")
    with open(name + ".part", "w") as f:  # renamed when complete: a reader never sees half a file
        json.dump(out, f)
    os.replace(name + ".part", name)


class GatherAtEpochEnd(Model):
    """Runs a collective in on_train_epoch_end, between the progress bar's read and the other ranks'."""

    def on_train_epoch_end(self):
        self.all_gather(torch.arange(3.0))


class BreakEngineOnRank1(L.Callback):
    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            engine = trainer.strategy.mechanism.engine
            norms = engine.per_sample_squared_norms
            engine.per_sample_squared_norms = lambda: 4.0 * norms()


def data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    )


def main(scenarios: str, devices: int, outdir: str) -> None:
    for scenario in scenarios.split(","):
        run_scenario(scenario, devices, outdir)


def run_scenario(scenario: str, devices: int, outdir: str) -> None:
    mode, variant = split_scenario(scenario, ("bk", "hooks", "ghost", "buckets", "frozen"))
    L.seed_everything(42, verbose=False)
    engine = variant if variant in ("bk", "hooks", "ghost") else "auto"
    recorder = Recorder()
    callbacks = [recorder]
    kwargs = dict(
        accelerator="cpu",
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="64-true",
    )
    # noise: ~10^4 coordinates per step, so the std is measured to about 1%
    model = Model(zero_gradient=(mode == "noise"), hidden=1000 if mode == "noise" else 8)
    if mode == "exact":
        # sigma = 0, no Poisson: one step per epoch over all 16 examples (8 per rank on 2 ranks)
        strategy = DPAutoStrategy(
            engine=engine,
            noise_multiplier=0.0,
            poisson_sampling=False,
            clipping="abadi",
            max_grad_norm=0.5,
            bucket_cap_mb=100 / 2**20 if variant == "buckets" else 25.0,
        )
        loader = DataLoader(data(16), batch_size=16 // devices)
        trainer = L.Trainer(strategy=strategy, max_epochs=3, callbacks=callbacks, **kwargs)
    elif mode in ("batchnorm", "batchnorm_train"):
        # batchnorm: exact's run with an eval-mode BatchNorm; batchnorm_train: the BatchNorm left in
        # train mode (batch statistics), which every rank must refuse before any update
        # AUTO-S: its factors are the reference's formula to the last digit (abadi's add 1e-6 to the norm)
        model = BatchNormModel(train_mode=(mode == "batchnorm_train"), frozen=(variant == "frozen"))
        strategy = DPAutoStrategy(
            engine=engine, noise_multiplier=0.0, poisson_sampling=False, clipping="auto_s", max_grad_norm=0.5
        )
        loader = DataLoader(data(16), batch_size=16 // devices)
        trainer = L.Trainer(strategy=strategy, max_epochs=2, callbacks=callbacks, **kwargs)
        # a refusal that reached one rank only would leave the other waiting in an all-reduce: the
        # guard ends the processes with every rank's stack instead of at the test's timeout
        faulthandler.dump_traceback_later(120, exit=True)
    elif mode == "noise":
        # a look of the run-time checks at the third step: a subset of the noise, summed over ranks
        checks = RunTimeChecks(check_every=2)
        strategy = DPAutoStrategy(engine=engine, noise_multiplier=1.0, max_grad_norm=2.0, run_checks=checks)
        loader = DataLoader(data(64), batch_size=16 // devices)
        trainer = L.Trainer(strategy=strategy, max_steps=4, callbacks=callbacks, **kwargs)
    elif mode == "empty":
        strategy = DPAutoStrategy(engine=engine, noise_multiplier=1.0)
        loader = DataLoader(data(20), batch_size=1)
        trainer = L.Trainer(strategy=strategy, max_epochs=2, callbacks=callbacks, **kwargs)
    elif mode == "accumulate":
        strategy = DPAutoStrategy(engine=engine, noise_multiplier=0.0, poisson_sampling=False)
        loader = DataLoader(data(16), batch_size=8 // devices)
        trainer = L.Trainer(
            strategy=strategy, max_epochs=2, accumulate_grad_batches=2, callbacks=callbacks, **kwargs
        )
    elif mode == "budget":
        from lightning_autodp import PrivacyBudget

        budget = PrivacyBudget(target_epsilon=2.0, delta=1e-3, accountant="rdp")
        strategy = DPAutoStrategy(engine=engine, noise_multiplier=2.0)
        loader = DataLoader(data(64), batch_size=16 // devices)
        trainer = L.Trainer(strategy=strategy, max_epochs=1000, callbacks=[recorder, budget], **kwargs)
    elif mode == "verify_fails_on_rank1":
        # Rank 1's engine reports norms twice too large: only its verification can fail.
        strategy = DPAutoStrategy(engine=engine, noise_multiplier=1.0)
        loader = DataLoader(data(64), batch_size=16 // devices)
        callbacks.append(BreakEngineOnRank1())
        trainer = L.Trainer(strategy=strategy, max_steps=2, callbacks=callbacks, **kwargs)
    elif mode == "epsilon_log":
        # PrivacyBudget's epsilon log under the conditions that hung a plain sync_dist=True: the progress
        # bar (rank 0 only) reads the metric first, the LightningModule's on_train_epoch_end runs a
        # collective, the budget stops training mid-epoch (17 steps, 4 per epoch). A hang exits here
        # with every rank's stack instead of at test_ddp's subprocess timeout.
        from lightning.pytorch.loggers import CSVLogger

        from lightning_autodp import PrivacyBudget

        faulthandler.dump_traceback_later(120, exit=True)
        model = GatherAtEpochEnd()
        budget = PrivacyBudget(target_epsilon=2.0, delta=1e-3, accountant="rdp")
        strategy = DPAutoStrategy(engine=engine, noise_multiplier=2.0)
        loader = DataLoader(data(64), batch_size=16 // devices)
        kwargs.update(enable_progress_bar=True, logger=CSVLogger(outdir, name="csv", version=0))
        trainer = L.Trainer(strategy=strategy, max_epochs=100, callbacks=[recorder, budget], **kwargs)
    else:
        raise KeyError(scenario)
    params_before = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    bn_before = model.batch_norm_state() if isinstance(model, BatchNormModel) else None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, loader)
    except BatchNormModeError as err:
        # every rank writes its refusal; the ranks go on to the next scenario together
        faulthandler.cancel_dump_traceback_later()
        params = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
        out = {
            "refused": str(err),
            "steps": strategy.steps,
            "global_step": trainer.global_step,
            "params_unchanged": params == params_before,
            "batch_norm": [bn_before, model.batch_norm_state()],
        }
        write(outdir, scenario, devices, trainer.global_rank, out)
        return
    faulthandler.cancel_dump_traceback_later()  # the hang guards: later scenarios are not hangs
    checks = strategy.mechanism.checks
    out = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "steps": strategy.steps,
        "engine": strategy.engine,
        "bucket_cap_mb": strategy.bucket_cap_mb,
        "sample_rate": strategy.sample_rate if strategy.poisson_sampling else None,
        "expected_batch_size": strategy.expected_batch_size if strategy.poisson_sampling else None,
        "params": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
        "grads": recorder.grads,
        "global_step": trainer.global_step,
        "looks": [checks.noise_looks, checks.sample_looks] if checks is not None else None,
    }
    if mode in ("budget", "epsilon_log"):
        out["epsilon"] = budget.epsilon
        out["history"] = budget.history
    if bn_before is not None:
        out["batch_norm"] = [bn_before, model.batch_norm_state()]  # running statistics before and after
    out["sync_dist_warnings"] = [str(w.message) for w in caught if "sync_dist" in str(w.message)]
    write(outdir, scenario, devices, trainer.global_rank, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
