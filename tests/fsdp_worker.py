"""Runs dp_fsdp trainings on 1 or 2 CPU processes (gloo); each rank writes what it saw as JSON.

Used by test_fsdp.py through a subprocess: Lightning's launcher re-runs this script for rank 1.
    python tests/fsdp_worker.py SCENARIO[,SCENARIO...] DEVICES OUTDIR

A scenario is a mode with an optional variant, ``mode@variant``: ``exact@ghost``/``batchnorm@ghost``
run the ghost engine (bk otherwise), ``interrupted@consolidated``/``resumed@consolidated`` write and read a
consolidated checkpoint (sharded otherwise). Several scenarios run one after the other in the same
processes, each with its own Trainer and seed: starting two interpreters and a process group costs
more than most scenarios' training.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scenarios import split_scenario  # noqa: E402

from lightning_autodp import DPFSDPStrategy, EmptyBatch, EngineVerificationError, PrivacyBudget  # noqa: E402

VOCAB, SEQ, DIM = 13, 5, 8


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, h):
        return h + torch.tanh(self.fc(self.norm(h)))


class TinyLM(L.LightningModule):
    """Embedding, a ModuleList of blocks (the default FSDP units), a head: a transformer's layout."""

    def __init__(
        self, width: int = DIM, blocks: int = 2, zero_gradient: bool = False, shard_first_block=False
    ):
        super().__init__()
        self.shard_first_block = shard_first_block
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, 3)
        self.zero_gradient = zero_gradient

    def configure_model(self):
        # a user's own sharding: only the first block is an FSDP unit of its own
        if self.shard_first_block and not isinstance(self.blocks[0], FSDPModule):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.blocks[0], mesh=init_device_mesh("cpu", (self.trainer.world_size,)))

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))

    def training_step(self, batch, batch_idx):
        ids, y = batch[0], batch[1]  # a third element (strings) in the "unsliceable" mode
        loss = F.cross_entropy(self(ids), y)
        return 0.0 * loss if self.zero_gradient else loss

    def validation_step(self, batch, batch_idx):
        ids, y = batch
        self.log("val_loss", F.cross_entropy(self(ids), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


class BatchNormBlock(nn.Module):
    """Linear, then an eval-mode BatchNorm1d over the features at every position (trainable affine)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.BatchNorm1d(dim)
        with torch.no_grad():  # pretrained-like running statistics
            self.norm.running_mean.copy_(torch.randn(dim))
            self.norm.running_var.copy_(torch.rand(dim) * 1.5 + 0.5)  # in [0.5, 2]
            self.norm.weight.copy_(torch.rand(dim) + 0.5)
            self.norm.bias.copy_(torch.randn(dim))
        self.norm.eval()

    def forward(self, h):
        # h: (B, SEQ, dim); BatchNorm1d normalises dim 1 of (B, C, L), summing its gradients over L
        return h + torch.tanh(self.norm(self.fc(h).transpose(1, 2)).transpose(1, 2))


class BatchNormLM(TinyLM):
    """TinyLM whose blocks (the FSDP units) hold an eval-mode BatchNorm1d between the Linear layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.blocks = nn.ModuleList(BatchNormBlock(DIM) for _ in range(2))

    def batch_norm_state(self) -> list[list[float]]:
        return [
            [b.norm.running_mean.tolist(), b.norm.running_var.tolist(), [float(b.norm.num_batches_tracked)]]
            for b in self.blocks
        ]


def tiny_llama() -> nn.Module:
    """A 2-layer Llama from transformers (random weights, float64): RMSNorm, rotary attention, MLP."""
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).double()


class LlamaLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama()

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        return self.model(input_ids=ids, labels=ids).loss  # mean over the tokens of equal-length rows

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(L.Callback):
    """The full gradient the optimizer sees (gathered) and this rank's local shard sizes."""

    def __init__(self, keep_local: bool = False):
        self.grads, self.local_grads, self.keep_local = [], [], keep_local

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(torch.cat([full(p.grad).flatten() for p in pl_module.parameters()]).tolist())
        if self.keep_local:
            self.local_grads.append([local(p.grad).flatten().tolist() for p in pl_module.parameters()])


class EmptyCounter(L.Callback):
    """Which steps drew no example on this rank."""

    def __init__(self):
        self.empty_steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if isinstance(batch, EmptyBatch):
            self.empty_steps.append(trainer.global_step)


class BreakEngine(L.Callback):
    def on_train_start(self, trainer, pl_module):
        engine = trainer.strategy.mechanism.engine
        norms = engine.per_sample_squared_norms
        engine.per_sample_squared_norms = lambda: 4.0 * norms()


def _exit_after_refusal(outdir: str, scenario: str, devices: int, rank: int) -> None:
    """End the process once every rank has written its refusal, without the interpreter's shutdown.

    A fit that ended in an exception mid-step under FSDP2 can leave torch's collective machinery with
    work in flight; tearing it down at interpreter exit aborted the process once in about twenty runs
    ("terminate called without an active exception"), after both ranks had written their results.
    What this scenario tests is in those results, so rank 0 (the launcher, whose exit the test waits
    for) waits for every rank's file and then leaves directly.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if rank == 0:
        deadline = time.monotonic() + 120
        names = [os.path.join(outdir, f"{scenario}-{devices}-rank{r}.json") for r in range(devices)]
        while not all(os.path.exists(n) for n in names) and time.monotonic() < deadline:
            time.sleep(0.1)
    os._exit(0)


def data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randint(0, VOCAB, (n, SEQ), generator=g), torch.randint(0, 3, (n,), generator=g)
    )


def main(scenarios: str, devices: int, outdir: str) -> None:
    for scenario in scenarios.split(","):
        run_scenario(scenario, devices, outdir)


def run_scenario(scenario: str, devices: int, outdir: str) -> None:
    mode, variant = split_scenario(scenario, ("ghost", "consolidated"))
    L.seed_everything(42, verbose=False)
    engine = "ghost" if variant == "ghost" else "bk"
    recorder = Recorder(keep_local=(mode == "noise"))
    empty_counter = EmptyCounter()
    callbacks: list = [recorder]
    kwargs = dict(
        accelerator="cpu",
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="64-true",
    )
    # float64 before fit: a checkpoint restored into the model before setup keeps every digit
    model = TinyLM(
        width=400 if mode == "noise" else DIM,
        zero_gradient=(mode == "noise"),
        shard_first_block=(mode == "accumulate" and devices > 1),
    ).double()
    fit_kwargs = {}
    budget = None
    if mode == "exact":
        # sigma = 0, no Poisson: one step per epoch over all 16 examples (16 / devices per rank)
        strategy = DPFSDPStrategy(
            engine=engine, noise_multiplier=0.0, poisson_sampling=False, clipping="auto_s", max_grad_norm=0.5
        )
        loader = DataLoader(data(16), batch_size=16 // devices)
        trainer = L.Trainer(strategy=strategy, max_epochs=2, callbacks=callbacks, **kwargs)
    elif mode == "batchnorm":
        # exact's run with an eval-mode BatchNorm1d in each block
        model = BatchNormLM().double()
        strategy = DPFSDPStrategy(
            engine=engine, noise_multiplier=0.0, poisson_sampling=False, clipping="auto_s", max_grad_norm=0.5
        )
        loader = DataLoader(data(16), batch_size=16 // devices)
        trainer = L.Trainer(strategy=strategy, max_epochs=2, callbacks=callbacks, **kwargs)
    elif mode == "bf16":
        model = model.float()
        kwargs["precision"] = "bf16-mixed"
        strategy = DPFSDPStrategy(
            engine=engine, noise_multiplier=0.0, poisson_sampling=False, clipping="auto_s", max_grad_norm=0.5
        )
        loader = DataLoader(data(16), batch_size=16 // devices)
        trainer = L.Trainer(strategy=strategy, max_epochs=1, callbacks=callbacks, **kwargs)
    elif mode == "llama":
        model = LlamaLM()
        strategy = DPFSDPStrategy(
            engine=engine, noise_multiplier=0.0, poisson_sampling=False, clipping="auto_s", max_grad_norm=0.5
        )
        loader = DataLoader(data(8), batch_size=8 // devices)
        trainer = L.Trainer(strategy=strategy, max_steps=1, callbacks=callbacks, **kwargs)
    elif mode == "accumulate":
        strategy = DPFSDPStrategy(engine=engine, noise_multiplier=0.0, poisson_sampling=False)
        loader = DataLoader(data(16), batch_size=8 // devices)
        trainer = L.Trainer(
            strategy=strategy, max_epochs=1, accumulate_grad_batches=2, callbacks=callbacks, **kwargs
        )
    elif mode == "noise":
        strategy = DPFSDPStrategy(engine=engine, noise_multiplier=1.0, max_grad_norm=2.0)
        loader = DataLoader(data(64), batch_size=16 // devices)
        trainer = L.Trainer(strategy=strategy, max_steps=2, callbacks=callbacks, **kwargs)
    elif mode == "sparse":
        # q = 2 / 20: a rank draws no example at about a third of the steps, the other rank often does
        # sigma = 0: a step where both ranks drew nothing must hand the optimizer an exact zero
        strategy = DPFSDPStrategy(engine=engine, noise_multiplier=0.0, max_grad_norm=1.0)
        loader = DataLoader(data(20), batch_size=1)
        callbacks.append(empty_counter)
        trainer = L.Trainer(strategy=strategy, max_steps=30, callbacks=callbacks, **kwargs)
    elif mode == "unsliceable":
        # a list of strings per batch: the examples cannot be cut out, so every rank skips verification
        tensors = data(32).tensors
        texts = [(tensors[0][i], tensors[1][i], f"text {i}") for i in range(32)]
        strategy = DPFSDPStrategy(engine=engine, noise_multiplier=1.0)
        loader = DataLoader(texts, batch_size=8)
        trainer = L.Trainer(strategy=strategy, max_steps=2, callbacks=callbacks, **kwargs)
    elif mode == "verify_broken":
        # every rank's engine reports norms twice too large: the sharded verification must refuse
        strategy = DPFSDPStrategy(engine=engine, noise_multiplier=1.0)
        loader = DataLoader(data(64), batch_size=16 // devices)
        callbacks.append(BreakEngine())
        trainer = L.Trainer(strategy=strategy, max_steps=2, callbacks=callbacks, **kwargs)
    elif mode == "budget":
        budget = PrivacyBudget(target_epsilon=2.0, delta=1e-3, accountant="rdp")
        strategy = DPFSDPStrategy(engine=engine, noise_multiplier=2.0)
        loader = DataLoader(data(64), batch_size=16 // devices)
        trainer = L.Trainer(strategy=strategy, max_epochs=1000, callbacks=[recorder, budget], **kwargs)
        fit_kwargs["val_dataloaders"] = DataLoader(data(8), batch_size=4)  # validation under sharding too
    elif mode in ("uninterrupted", "interrupted", "resumed"):
        # Poisson sampling, noise, a budget; 8 steps per epoch; resume from the step-6 checkpoint.
        budget = PrivacyBudget(target_epsilon=50.0, delta=1e-5, accountant="rdp")
        sharded = variant != "consolidated"
        strategy = DPFSDPStrategy(engine=engine, noise_multiplier=1.0, seed=7, sharded_checkpoint=sharded)
        loader = DataLoader(data(64), batch_size=8 // devices)
        ckpt_dir = os.path.join(outdir, f"checkpoints-{variant or 'sharded'}")
        ckpt = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir, every_n_train_steps=6, save_top_k=-1, filename="{step}"
        )
        callbacks = [recorder, budget] + ([ckpt] if mode == "interrupted" else [])
        kwargs["enable_checkpointing"] = mode == "interrupted"
        max_steps = 6 if mode == "interrupted" else 10
        trainer = L.Trainer(strategy=strategy, max_steps=max_steps, callbacks=callbacks, **kwargs)
        if mode == "resumed":
            (fit_kwargs["ckpt_path"],) = glob.glob(os.path.join(ckpt_dir, "step=6.ckpt"))
    else:
        raise KeyError(scenario)
    bn_before = model.batch_norm_state() if isinstance(model, BatchNormLM) else None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, loader, **fit_kwargs)
    except EngineVerificationError as err:
        name = os.path.join(outdir, f"{scenario}-{devices}-rank{trainer.global_rank}.json")
        with open(name + ".part", "w") as f:  # renamed when complete: rank 0 waits for the name
            json.dump({"refused": str(err), "steps": strategy.steps}, f)
        os.replace(name + ".part", name)
        _exit_after_refusal(outdir, scenario, devices, trainer.global_rank)
    out = {
        "checkpoint_is_dir": os.path.isdir(fit_kwargs["ckpt_path"]) if "ckpt_path" in fit_kwargs else None,
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "steps": strategy.steps,
        "engine": strategy.engine,
        "sharded": any(isinstance(p, DTensor) for p in model.parameters()),
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "expected_batch_size": strategy.expected_batch_size if strategy.poisson_sampling else None,
        "params": torch.cat([full(p).detach().flatten() for p in model.parameters()]).tolist(),
        "grads": recorder.grads,
        "local_grads": recorder.local_grads,
        "global_step": trainer.global_step,
        "epsilon": budget.epsilon if budget is not None else None,
        "val_loss": float(trainer.callback_metrics["val_loss"])
        if "val_loss" in trainer.callback_metrics
        else None,
        "empty_steps": empty_counter.empty_steps,
        "verify_warnings": [str(w.message) for w in caught if "could not verify" in str(w.message)],
    }
    if bn_before is not None:
        out["batch_norm"] = [bn_before, model.batch_norm_state()]  # running statistics before and after
        out["batch_norm_sharded"] = [
            isinstance(p, DTensor) for b in model.blocks for p in (b.norm.weight, b.norm.bias)
        ]
    with open(os.path.join(outdir, f"{scenario}-{devices}-rank{trainer.global_rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
