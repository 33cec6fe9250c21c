"""The verification before the first update: it catches the three kinds of per-example defects,
stays silent on exact engines, and leaves a seeded run bit-identical.

Each defect test has its mutation next to it: the same run with ``verify=False`` (or with the
hooks engine's own shape check switched off) trains to the end without any error, so the
verification is what refuses it.
"""

from __future__ import annotations

import random
import warnings
from collections import namedtuple

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from models import Classifier, loader, make_case, quiet_trainer
from reference import per_example_gradients
from test_examples import _one_thread  # noqa: F401 - the autouse one-thread fixture applies here too
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import lightning_autodp.integration.dp_mechanism as mechanism_module
from lightning_autodp import DPAutoStrategy
from lightning_autodp.engines.hooks import HooksEngine, _InPlaceGradSampleModule
from lightning_autodp.safeguards.verify import (
    EngineVerificationError,
    VerificationResult,
    slice_batch,
    verify_engine,
)

EXACT_ENGINES = ["bk", "ghost", "hooks"]


@pytest.fixture
def results(monkeypatch: pytest.MonkeyPatch) -> list[VerificationResult]:
    """The results of every verification the strategy runs."""
    seen: list[VerificationResult] = []

    def spy(*args, **kwargs) -> VerificationResult:
        result = verify_engine(*args, **kwargs)
        seen.append(result)
        return result

    monkeypatch.setattr(mechanism_module, "verify_engine", spy)
    return seen


def _fit(module: L.LightningModule, data: DataLoader, steps: int = 2, **strategy_kwargs) -> L.Trainer:
    strategy_kwargs.setdefault("noise_multiplier", 0.0)
    strategy_kwargs.setdefault("poisson_sampling", False)
    accumulate = strategy_kwargs.pop("accumulate_grad_batches", 1)
    trainer = quiet_trainer(
        strategy=DPAutoStrategy(**strategy_kwargs),
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
    )
    trainer.fit(module, data)
    return trainer


# ---------------------------------------------------------------------------- defect (a)


class PositionModel(nn.Module):
    """Token and position embeddings; positions looked up with ids of shape (1, T) (GPT-2/BERT style)."""

    def __init__(self, vocab: int = 11, length: int = 5, d: int = 6) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, T), broadcast over the batch below
        h = torch.tanh(self.tok(ids) + self.pos(positions))
        return self.head(h.mean(1))


def _ids_data(n: int = 8, length: int = 5, vocab: int = 11) -> DataLoader:
    g = torch.Generator().manual_seed(2)
    return loader(
        torch.randint(0, vocab, (n, length), generator=g), torch.randint(0, 3, (n,), generator=g), 8
    )


def test_hooks_engine_refuses_a_broadcast_parameter() -> None:
    with pytest.raises(RuntimeError, match=r"pos\.weight.*engine='auto' or engine='bk'"):
        _fit(Classifier(PositionModel()), _ids_data(), engine="hooks", verify=False)


def test_verification_catches_a_broadcast_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hooks engine's own shape check off: the verification alone must refuse.
    monkeypatch.setattr(HooksEngine, "_check_batch_dims", lambda self, grad_samples: None)
    model = Classifier(PositionModel())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(EngineVerificationError, match=r"engine='hooks'.*net\.pos\.weight") as info:
        _fit(model, _ids_data(), engine="hooks")
    assert "net.tok.weight" not in str(info.value) and "net.head.weight" not in str(info.value)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # refused before any update
    # Mutation: without the verification the broadcast gradient trains silently.
    trainer = _fit(Classifier(PositionModel()), _ids_data(), engine="hooks", verify=False)
    assert trainer.strategy.steps == 2


def _tiny_gpt2(dropout: float = 0.0):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=23, n_positions=8, n_embd=8, n_layer=1, n_head=2,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


class CausalLM(L.LightningModule):
    """Per-example mean next-token loss, averaged over the batch."""

    def __init__(self, model: nn.Module, expand_positions: bool = False) -> None:
        super().__init__()
        self.model = model
        self.expand_positions = expand_positions

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch["input_ids"]
        kwargs = {}
        if self.expand_positions:  # one row of position ids per example: exact under hooks
            kwargs["position_ids"] = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        logits = self.model(input_ids=ids, **kwargs).logits[:, :-1]
        per_token = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        self.log("train_loss", per_token.mean())
        return per_token.mean(1).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _token_data(n: int = 8, length: int = 6) -> DataLoader:
    ids = torch.randint(0, 23, (n, length), generator=torch.Generator().manual_seed(4))
    return DataLoader(torch.utils.data.TensorDataset(ids), batch_size=8)


@pytest.mark.parametrize("check_batch_dims", [True, False])
def test_gpt2_under_hooks_is_refused(monkeypatch: pytest.MonkeyPatch, check_batch_dims: bool) -> None:
    # One way or the other: the engine's shape check alone (verify off), or the verification alone.
    if not check_batch_dims:
        monkeypatch.setattr(HooksEngine, "_check_batch_dims", lambda self, grad_samples: None)
    error = RuntimeError if check_batch_dims else EngineVerificationError
    with pytest.raises(error, match=r"transformer\.wpe\.weight") as info:
        _fit(CausalLM(_tiny_gpt2()), _token_data(), engine="hooks", verify=not check_batch_dims)
    assert type(info.value) is error


# ---------------------------------------------------------------------------- defect (b)


class RelativeBias(nn.Module):
    """Attention with a learned bias looked up on a (T, T) table of relative distances (no batch dim)."""

    def __init__(self, length: int = 4, d: int = 6) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.rel = nn.Embedding(2 * length - 1, 1)
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        distance = torch.arange(t).unsqueeze(0) - torch.arange(t).unsqueeze(1) + t - 1  # (T, T)
        h = self.proj(x)
        scores = h @ h.transpose(1, 2) + self.rel(distance).squeeze(-1)  # (B, T, T) + (T, T)
        return self.head((scores.softmax(-1) @ h).mean(1))


def _sequence_data(n: int, length: int) -> DataLoader:
    g = torch.Generator().manual_seed(5)
    return loader(torch.randn(n, length, 6, generator=g), torch.randint(0, 3, (n,), generator=g), n)


@pytest.mark.parametrize("engine", ["bk", "hooks"])
def test_verification_catches_a_batch_free_table_when_b_equals_t(engine: str) -> None:
    # B = T = 4 = the examples verified: the (T, T) table looks like a batch to both engines.
    with pytest.raises(EngineVerificationError, match=r"net\.rel\.weight"):
        _fit(Classifier(RelativeBias(length=4)), _sequence_data(4, 4), engine=engine)
    # Mutation: without the verification the engine's wrong per-example gradients train silently.
    trainer = _fit(Classifier(RelativeBias(length=4)), _sequence_data(4, 4), engine=engine, verify=False)
    assert trainer.strategy.steps == 2


# ---------------------------------------------------------------------------- defect (c)


class ChannelsLastCNN(nn.Module):
    """A convolution fed a channels-last tensor, as some vision models produce."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * 5 * 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x.contiguous(memory_format=torch.channels_last))
        return self.head(torch.tanh(h).flatten(1))


def _image_data(n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(6)
    return loader(torch.randn(n, 2, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g), n)


def test_hooks_engine_is_exact_on_channels_last_convolutions() -> None:
    net = ChannelsLastCNN().double()
    data = _image_data()
    x, y = next(iter(data))
    x = x.double()
    engine = HooksEngine(net)
    with engine.capturing():
        F.cross_entropy(net(x), y, reduction="sum").backward()
    norms = engine.per_sample_squared_norms().sqrt()
    summed: dict = {}
    engine.accumulate_weighted_sum(torch.ones(len(y), dtype=torch.float64), summed)
    engine.remove()
    grads = per_example_gradients(net, lambda m, i: F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]), len(y))
    ref_norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in gi)) for gi in grads])
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=0)
    for k, p in enumerate(p for p in net.parameters()):
        torch.testing.assert_close(summed[p], sum(gi[k] for gi in grads), rtol=1e-10, atol=1e-12)


def test_verification_catches_a_wrong_third_party_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from opacus.grad_sample.conv import compute_conv_grad_sample

    # Opacus 1.6's own Conv2d rule, which is wrong on channels-last input, instead of the fixed one.
    monkeypatch.setitem(_InPlaceGradSampleModule.GRAD_SAMPLERS, nn.Conv2d, compute_conv_grad_sample)
    with pytest.raises(EngineVerificationError, match=r"net\.conv\.weight") as info:
        _fit(Classifier(ChannelsLastCNN()), _image_data(), engine="hooks")
    assert "net.head" not in str(info.value)
    # Mutation: without the verification the wrong rule trains silently.
    trainer = _fit(Classifier(ChannelsLastCNN()), _image_data(), engine="hooks", verify=False)
    assert trainer.strategy.steps == 2


def test_verification_catches_a_wrongly_registered_grad_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    linear_rule = _InPlaceGradSampleModule.GRAD_SAMPLERS[nn.Linear]

    def off_by_one_example(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict:
        out = linear_rule(layer, activations, backprops)
        return {p: torch.cat([g[1:2], g[1:]]) for p, g in out.items()}  # example 0 gets example 1's

    monkeypatch.setitem(_InPlaceGradSampleModule.GRAD_SAMPLERS, nn.Linear, off_by_one_example)
    net, x, y = make_case("linear")
    with pytest.raises(EngineVerificationError, match=r"net\.0\.weight.*net\.0\.bias|net\.0\.bias.*net\.0"):
        _fit(Classifier(net), loader(x, y, 8), engine="hooks")


# ---------------------------------------------------------------------------- no false alarms


@pytest.mark.parametrize("engine", EXACT_ENGINES + ["auto"])
def test_no_false_alarm_on_a_small_cnn(engine: str, results: list[VerificationResult]) -> None:
    net, x, y = make_case("groupnorm")
    trainer = _fit(Classifier(net), loader(x, y, 8), engine=engine)
    assert trainer.strategy.steps == 2
    (result,) = results  # once per fit, not per step
    assert result.skipped is None and result.examples == 4
    assert result.max_norm_error < 1e-4 and result.max_sum_error < 1e-4


@pytest.mark.parametrize("engine", ["hooks", "auto", "bk", "ghost"])
def test_no_false_alarm_on_tiny_gpt2_with_dropout(engine: str, results: list[VerificationResult]) -> None:
    # Position ids expanded to the batch: the exact way to run GPT-2 under per-example engines.
    module = CausalLM(_tiny_gpt2(dropout=0.2), expand_positions=True)
    try:
        trainer = _fit(module, _token_data(), engine=engine)
    except ValueError as unsupported:  # engines that do not cover GPT-2's Conv1D refuse at setup
        if "does not support" not in str(unsupported):
            raise
        pytest.skip(f"engine={engine!r} does not support GPT-2 here: {unsupported}")
    assert trainer.strategy.steps == 2
    (result,) = results
    assert result.skipped is None and result.examples == 4


@pytest.mark.parametrize("engine", ["bk", "hooks"])
def test_sum_reduction_accumulation_frozen_and_unused_parameters(
    engine: str, results: list[VerificationResult]
) -> None:
    net, x, y = make_case("linear")
    net.add_module("unused", nn.Linear(3, 3))  # trainable, never touched by the loss
    net[0].weight.requires_grad_(False)  # frozen
    _fit(Classifier(net, reduction="sum"), loader(x, y, 4), loss_reduction="sum", accumulate_grad_batches=2)
    _fit(Classifier(make_case("linear")[0]), loader(x, y, 4), engine=engine, accumulate_grad_batches=2)
    assert [r.skipped for r in results] == [None, None]


def test_no_false_alarm_under_bf16_autocast(results: list[VerificationResult]) -> None:
    net, x, y = make_case("conv2d")
    trainer = quiet_trainer(
        strategy=DPAutoStrategy(noise_multiplier=0.0, poisson_sampling=False),
        precision="bf16-mixed",
        max_steps=1,
        limit_val_batches=0,
    )
    trainer.fit(Classifier(net), loader(x, y, 8))
    assert results[0].skipped is None


def test_float64_tolerance_catches_small_defects() -> None:
    # A per-example gradient off by 1e-4 of its size: below float32's tolerance, caught in float64.
    net, x, y = make_case("linear")
    net = net.double()
    module = Classifier(net)
    engine = HooksEngine(module)
    original = engine.per_sample_squared_norms
    engine.per_sample_squared_norms = lambda: original() * (1 + 2e-4)  # type: ignore[method-assign]
    with pytest.raises(EngineVerificationError, match="norms off by up to 0.0001"):
        verify_engine(module, engine, ((x.double(), y), 0))
    engine.remove()


# ---------------------------------------------------------------------------- batches


def test_slice_batch_of_any_pytree() -> None:
    transformers = pytest.importorskip("transformers")
    pair = namedtuple("pair", "x y")
    x, y, table = torch.randn(5, 3), torch.arange(5), torch.randn(2, 2)
    batch = {"a": (x, [y, table]), "b": pair(x, y), "c": transformers.BatchEncoding({"input_ids": y})}
    out = slice_batch(batch, 1, 3)
    assert torch.equal(out["a"][0], x[1:3]) and torch.equal(out["a"][1][0], y[1:3])
    assert out["a"][1][1] is table  # not batched: dim 0 is not the batch size
    assert isinstance(out["b"], pair) and torch.equal(out["b"].y, y[1:3])
    assert isinstance(out["c"], transformers.BatchEncoding) and torch.equal(out["c"]["input_ids"], y[1:3])


class DictData(Dataset):
    def __init__(self, texts: bool = False) -> None:
        self.ids = torch.randint(0, 23, (16, 6), generator=torch.Generator().manual_seed(7))
        self.texts = texts

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.ids[i], "attention_mask": torch.ones(6)}
        if self.texts:
            item["text"] = f"example {i}"
        return item


def _batch_encoding_collate(items: list[dict]):
    from transformers import BatchEncoding

    batch = {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "attention_mask")}
    if "text" in items[0]:
        batch["text"] = [it["text"] for it in items]
    return BatchEncoding(batch)


def test_dict_and_batch_encoding_batches(results: list[VerificationResult]) -> None:
    pytest.importorskip("transformers")
    _fit(CausalLM(_tiny_gpt2(), expand_positions=True), DataLoader(DictData(), batch_size=8), engine="hooks")
    data = DataLoader(DictData(), batch_size=8, collate_fn=_batch_encoding_collate)
    _fit(CausalLM(_tiny_gpt2(), expand_positions=True), data, engine="hooks")
    assert [(r.skipped, r.examples) for r in results] == [(None, 4), (None, 4)]


def test_unsliceable_batch_warns_once(results: list[VerificationResult]) -> None:
    pytest.importorskip("transformers")
    data = DataLoader(DictData(texts=True), batch_size=8, collate_fn=_batch_encoding_collate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(CausalLM(_tiny_gpt2(), expand_positions=True), data, steps=3, engine="hooks")
    skipped = [w for w in caught if "could not verify" in str(w.message)]
    assert len(skipped) == 1 and "list of 8 Python values" in str(skipped[0].message)
    assert trainer.strategy.steps == 3
    assert results[0].skipped is not None


# ---------------------------------------------------------------------------- switches and state


def test_verify_false_runs_no_verification(results: list[VerificationResult]) -> None:
    net, x, y = make_case("linear")
    _fit(Classifier(net), loader(x, y, 8), verify=False)
    assert results == []


@pytest.mark.parametrize("kwargs", [{"verify": "yes"}, {"verify_examples": 0}, {"verify_examples": 2.5}])
def test_bad_verify_arguments_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="verify"):
        DPAutoStrategy(**kwargs)


class LoggingDropoutLM(CausalLM):
    def __init__(self, model: nn.Module, expand_positions: bool = False) -> None:
        super().__init__(model, expand_positions)
        self.register_buffer("steps_seen", torch.zeros(()))
        self.draws: list[float] = []

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        self.steps_seen += 1  # a side effect on a buffer
        self.draws.append(random.random())  # Python's generator
        self.log("calls", 1.0, on_step=False, on_epoch=True, reduce_fx="sum")
        return super().training_step(batch, batch_idx) + 0.0 * torch.rand(())  # draws from the global RNG

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_seeded_runs_are_bit_identical_with_verify_on_and_off() -> None:
    pytest.importorskip("transformers")
    runs = []
    for verify in (True, False):
        L.seed_everything(3, verbose=False)
        module = LoggingDropoutLM(_tiny_gpt2(dropout=0.3), expand_positions=True)
        trainer = _fit(
            module,
            _token_data(n=24),
            steps=3,
            engine="hooks",
            noise_multiplier=1.0,
            poisson_sampling=True,
            verify=verify,
        )
        runs.append((module, trainer, torch.rand(3)))
    (a, ta, ra), (b, tb, rb) = runs
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    sa, sb = ta.optimizers[0].state_dict()["state"], tb.optimizers[0].state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    assert a.steps_seen.item() == b.steps_seen.item() == 3  # buffers restored after verification
    assert torch.equal(ra, rb) and a.draws[-3:] == b.draws  # the global RNGs continues from the same state
    # The verification's training_step calls logged nothing: 3 calls, one per real step.
    assert ta.callback_metrics["calls"].item() == tb.callback_metrics["calls"].item() == 3.0


class Jitter(nn.Module):
    """Random noise that ignores train/eval mode, unlike dropout."""

    def forward(self, x: Tensor) -> Tensor:
        return x * (1 + 0.5 * torch.rand_like(x))


def test_random_step_skips_with_a_warning(results: list[VerificationResult]) -> None:
    net = nn.Sequential(nn.Linear(6, 5), Jitter(), nn.Tanh(), nn.Linear(5, 3))
    _, x, y = make_case("linear")
    with pytest.warns(UserWarning, match="different gradients for the same example"):
        trainer = _fit(Classifier(net), loader(x, y, 8), engine="bk")
    assert trainer.strategy.steps == 2 and results[0].skipped is not None
