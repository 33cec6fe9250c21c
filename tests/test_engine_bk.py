"""The book-keeping and ghost-clipping engines against a per-example loop (one backward per example)."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from reference import per_example_gradients
from torch import Tensor, nn

from lightning_autodp.engines.bookkeeping import BookKeepingEngine, GhostClippingEngine
from lightning_autodp.engines.rules import module as module_rule

ENGINES = [BookKeepingEngine, GhostClippingEngine]

LossFn = Callable[[nn.Module, Tensor], Tensor]  # (net, inputs) -> per-example losses (b,)


class Unpack(nn.Module):
    def forward(self, xs: tuple[Tensor, Tensor]) -> Tensor:
        return xs[0].mean(1) * xs[1].mean(1, keepdim=True)


class Pool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


class TiedLM(nn.Module):
    """Embedding and output head share one weight; the embedding is also called twice."""

    def __init__(self, vocab: int = 11, d: int = 6) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.embedding(ids))) + self.embedding(ids.flip(1))
        return self.head(h)


class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool, cross: bool = False, need_weights: bool = False) -> None:
        super().__init__()
        self.batch_first, self.cross, self.need_weights = batch_first, cross, need_weights
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.memory = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        kv = self.memory(x.flip(0 if not self.batch_first else 1)) if self.cross else x
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[0 if not self.batch_first else 1]).to(x)
        out, _ = self.attn(x, kv, kv, attn_mask=mask, need_weights=self.need_weights)
        return out if self.batch_first else out.transpose(0, 1)


class SeqFirstEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x.transpose(0, 1)).transpose(0, 1)


class PositionModel(nn.Module):
    """Token plus position embeddings, the positions looked up with ids of shape (1, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.pos = nn.Embedding(5, 6)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.tok(ids) + self.pos(positions)


class TokenEmbed(nn.Module):
    """A ViT-like non-leaf module: class token, position embedding and layer scale used directly."""

    def __init__(self, patches: int = 4, d_in: int = 5, d: int = 6) -> None:
        super().__init__()
        self.patch = nn.Linear(d_in, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.position = nn.Parameter(torch.randn(1, patches + 1, d))
        self.gamma = nn.Parameter(torch.randn(d))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.patch(x)], dim=1)
        return (h + self.position) * self.gamma


class ScaledLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass with its own forward: the LayerNorm rule must not be used for it."""

    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * super().forward(x) + self.weight


class PlainLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass that keeps LayerNorm's forward: matched by MRO."""


class ChannelsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.to(memory_format=torch.channels_last))


class KdimAttention(nn.Module):
    """Cross-attention with kdim/vdim != embed_dim and a key padding mask."""

    def __init__(self) -> None:
        super().__init__()
        self.k, self.v = nn.Linear(8, 5), nn.Linear(8, 7)
        self.attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=7, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        pad = x[:, :, 0] > 0.5  # a per-example padding pattern
        pad[:, 0] = False
        out, _ = self.attn(x, self.k(x), self.v(x), key_padding_mask=pad, need_weights=False)
        return out


class InputScale(nn.Module):
    """A parameter used at the model's input (no rule): its output depends on it alone."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * (1.0 + self.scale), x.sum(-1)


def _randomized(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(5))
    return norm


def _ce(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = net(x)
    if out.dim() == 3:  # (b, T, classes): per-example mean over tokens
        return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)
    return F.cross_entropy(out, y, reduction="none")


def _case(name: str, n: int = 6) -> tuple[nn.Module, Tensor, LossFn]:
    g = torch.Generator().manual_seed(3)
    seq_labels = None
    if name == "linear":
        net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        x = torch.randn(n, 6, generator=g)
    elif name == "linear3d_ghost":  # T^2 (d + p) < T d p
        net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), Pool(), nn.Linear(16, 3))
        x = torch.randn(n, 3, 16, generator=g)
    elif name == "linear3d_materialised":  # T^2 (d + p) > T d p
        net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), Pool(), nn.Linear(3, 3))
        x = torch.randn(n, 9, 2, generator=g)
    elif name == "linear4d":
        net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(1), nn.Linear(3 * 2 * 5, 3))
        x = torch.randn(n, 3, 2, 4, generator=g)
    elif name == "embedding":
        net = nn.Sequential(nn.Embedding(7, 4, padding_idx=0), Pool(), nn.Linear(4, 3))
        x = torch.randint(0, 7, (n, 9), generator=g)  # repeated ids within an example
    elif name == "conv1d":
        net = nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)
        )
        x = torch.randn(n, 2, 7, generator=g)
    elif name == "conv2d":
        net = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding="same", dilation=2), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2),
            nn.Flatten(), nn.Linear(2 * 3 * 3, 3),
        )  # fmt: skip
        x = torch.randn(n, 2, 6, 6, generator=g)
    elif name == "layernorm":
        net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), Pool(), nn.Linear(8, 3))
        x = torch.randn(n, 5, 6, generator=g)
    elif name == "layernorm2d":
        net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
        x = torch.randn(n, 6, generator=g)
    elif name == "groupnorm":
        net = nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
        )
        x = torch.randn(n, 2, 6, 6, generator=g)
    elif name == "rmsnorm":
        net = nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.Tanh(), Pool(), nn.Linear(8, 3))
        x = torch.randn(n, 5, 6, generator=g)
    elif name in ("mha", "mha_seq_first", "mha_cross", "mha_weights"):
        attn = SelfAttention(
            batch_first=name != "mha_seq_first", cross=name == "mha_cross", need_weights=name == "mha_weights"
        )
        net = nn.Sequential(attn, nn.Tanh(), Pool(), nn.Linear(8, 3))
        x = torch.randn(n, 5, 8, generator=g)
    elif name == "encoder_layer":
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        net = nn.Sequential(layer, Pool(), nn.Linear(8, 3))
        x = torch.randn(n, 5, 8, generator=g)
    elif name == "encoder_layer_seq_first":
        net = nn.Sequential(SeqFirstEncoder(), Pool(), nn.Linear(8, 3))
        x = torch.randn(n, 5, 8, generator=g)
    elif name == "hf_conv1d":
        from transformers.pytorch_utils import Conv1D

        net = nn.Sequential(Conv1D(8, 6), nn.Tanh(), Conv1D(7, 8), Pool(), nn.Linear(7, 3))
        x = torch.randn(n, 5, 6, generator=g)
    elif name in ("llama_rmsnorm", "gemma_rmsnorm"):
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        norm = _randomized(LlamaRMSNorm(8) if name == "llama_rmsnorm" else GemmaRMSNorm(8))
        net = nn.Sequential(nn.Linear(6, 8), norm, nn.Tanh(), Pool(), nn.Linear(8, 3))
        x = torch.randn(n, 5, 6, generator=g)
    elif name in ("layernorm_subclass", "layernorm_subclass_forward"):
        cls = PlainLayerNorm if name == "layernorm_subclass" else ScaledLayerNorm
        net = nn.Sequential(nn.Linear(6, 8), _randomized(cls(8)), nn.Tanh(), Pool(), nn.Linear(8, 3))
        x = torch.randn(n, 5, 6, generator=g)
    elif name == "shared_position_ids":
        net = nn.Sequential(PositionModel(), nn.Tanh(), Pool(), nn.Linear(6, 3))
        x = torch.randint(0, 11, (n, 5), generator=g)
    elif name == "cls_token":
        net = nn.Sequential(TokenEmbed(), nn.Tanh(), Pool(), nn.Linear(6, 3))
        x = torch.randn(n, 4, 5, generator=g)
    elif name == "grouped_conv1d":
        net = nn.Sequential(
            nn.Conv1d(4, 6, 3, padding=1, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 7, 3)
        )
        x = torch.randn(n, 4, 7, generator=g)
    elif name == "depthwise_conv2d":
        net = nn.Sequential(
            nn.Conv2d(3, 6, 3, groups=3), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),
            nn.Flatten(), nn.Linear(6 * 4 * 4, 3),
        )  # fmt: skip
        x = torch.randn(n, 3, 6, 6, generator=g)
    elif name == "conv2d_channels_last":
        net = nn.Sequential(ChannelsLast(), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
        x = torch.randn(n, 3, 6, 6, generator=g)
    elif name == "mha_kdim":
        net = nn.Sequential(KdimAttention(), nn.Tanh(), Pool(), nn.Linear(8, 3))
        x = torch.randn(n, 5, 8, generator=g)
    elif name == "input_scale":
        net = nn.Sequential(InputScale(6), Unpack(), nn.Linear(6, 3))
        x = torch.randn(n, 4, 6, generator=g)
    elif name == "tied":
        net = TiedLM()
        x = torch.randint(0, 11, (n, 5), generator=g)
        seq_labels = torch.randint(0, 11, (n, 5), generator=g)
    elif name == "demo_transformer":
        from lightning.pytorch.demos import Transformer

        net = Transformer(vocab_size=13, ninp=8, nhead=2, nhid=16, nlayers=1, dropout=0.0)
        x = torch.randint(0, 13, (n, 5), generator=g)
        targets = torch.randint(0, 13, (n, 5), generator=g)

        def demo_loss(m: nn.Module, ids: Tensor) -> Tensor:
            idx = _rows(ids, x)
            out = m(ids, ids).view(ids.shape[0], ids.shape[1], -1)
            return F.nll_loss(out.transpose(1, 2), targets[idx], reduction="none").mean(1)

        return net.double(), x, demo_loss
    else:
        raise KeyError(name)
    labels = seq_labels if seq_labels is not None else torch.randint(0, 3, (n,), generator=g)

    def loss(m: nn.Module, inputs: Tensor) -> Tensor:
        return _ce(m, inputs, labels[_rows(inputs, x)])

    net = net.double()
    return net, (x.double() if x.is_floating_point() else x), loss


def _rows(inputs: Tensor, full: Tensor) -> Tensor:
    """Which examples of ``full`` ``inputs`` holds (the reference feeds one example at a time)."""
    if inputs.shape[0] == full.shape[0]:
        return torch.arange(full.shape[0])
    matches = [i for i in range(full.shape[0]) if torch.equal(full[i : i + 1].to(inputs.dtype), inputs)]
    return torch.tensor(matches[:1])


def _reference(net: nn.Module, x: Tensor, loss: LossFn) -> tuple[list[nn.Parameter], list[list[Tensor]]]:
    grads = per_example_gradients(net, lambda m, i: loss(m, x[i : i + 1]).sum(), x.shape[0])
    return [p for p in net.parameters() if p.requires_grad], grads


def _engine_outputs(net: nn.Module, x: Tensor, loss: LossFn, weights: Tensor, engine_cls=BookKeepingEngine):
    engine = engine_cls(net)
    engine.expect_batch_size(x.shape[0])
    with engine.capturing():
        total = loss(net, x).sum()
        total.backward(retain_graph=engine.needs_backward_root)
    engine.set_backward_root(total)
    sq_norms = engine.per_sample_squared_norms()
    summed: dict[nn.Parameter, Tensor] = {}
    engine.accumulate_weighted_sum(weights, summed)
    batch = engine.batch_size
    engine.reset()
    return engine, sq_norms, summed, batch


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


CASES = [
    "linear", "linear3d_ghost", "linear3d_materialised", "linear4d", "embedding", "conv1d", "conv2d",
    "layernorm", "layernorm2d", "groupnorm", "rmsnorm", "mha", "mha_seq_first", "mha_cross", "mha_weights",
    "encoder_layer", "encoder_layer_seq_first", "tied", "demo_transformer",
    "hf_conv1d", "llama_rmsnorm", "gemma_rmsnorm", "layernorm_subclass", "layernorm_subclass_forward",
    "shared_position_ids", "cls_token", "grouped_conv1d", "depthwise_conv2d", "conv2d_channels_last",
    "mha_kdim", "input_scale",
]  # fmt: skip


@pytest.mark.parametrize("engine_cls", ENGINES)
@pytest.mark.parametrize("case", CASES)
def test_norms_and_weighted_sum_match_per_example_loop(case, engine_cls):
    net, x, loss = _case(case)
    ref_net = copy.deepcopy(net)
    params, grads = _reference(ref_net, x, loss)
    ref_sq = torch.stack([sum((g**2).sum() for g in gi) for gi in grads])
    weights = torch.rand(x.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5

    engine, sq_norms, summed, batch = _engine_outputs(net, x, loss, weights, engine_cls)

    assert batch == x.shape[0]
    assert sq_norms.dtype == torch.float64
    # GemmaRMSNorm computes in float32 whatever the model's dtype: per-example float32 sums differ from
    # the batched ones in their last digits.
    tol = 1e-6 if case == "gemma_rmsnorm" else 1e-10
    assert _rel(sq_norms, ref_sq) < tol
    own = [p for p in net.parameters() if p.requires_grad]
    assert len(own) == len(params)
    expected_sums = [sum(w * gi[k] for w, gi in zip(weights, grads)) for k in range(len(own))]
    # Parameters whose gradient is zero up to rounding (a key bias under softmax) are compared
    # with the scale of the whole update instead of their own.
    floor = 1e-6 * float(torch.stack([e.norm() for e in expected_sums]).norm())
    for k, p in enumerate(own):
        expected = expected_sums[k]
        got = summed.get(p, torch.zeros_like(p))
        err = float((got - expected).norm()) / max(float(expected.norm()), floor)
        assert err < tol, f"parameter {k} {tuple(p.shape)}"
        # autograd never computed the non-private gradient of a handled parameter
        assert p.grad is None
    engine.remove()


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_tied_weights_include_cross_terms(engine_cls):
    """Without the cross term <g_emb, g_head> the norm would be wrong: check it is not negligible."""
    net, x, loss = _case("tied")
    params, grads = _reference(copy.deepcopy(net), x, loss)
    shared = [k for k, p in enumerate(net.parameters()) if p is net.embedding.weight][0]
    ones = torch.ones(x.shape[0], dtype=torch.float64)
    engine, sq_norms, _, _ = _engine_outputs(net, x, loss, ones, engine_cls)
    # The same model with the weight untied: each copy's norm separately, no cross term.
    untied = copy.deepcopy(net)
    untied.head.weight = nn.Parameter(untied.embedding.weight.detach().clone())
    _, untied_sq, _, _ = _engine_outputs(untied, x, loss, ones, engine_cls)
    ref = torch.stack([sum((g**2).sum() for g in gi) for gi in grads])
    assert _rel(sq_norms, ref) < 1e-10
    assert _rel(untied_sq, ref) > 1e-3  # the cross terms matter in this test
    assert all(gi[shared].abs().sum() > 0 for gi in grads)
    engine.remove()


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_frozen_and_unused_parameters(engine_cls):
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Linear(3, 2)).double()
    net[0].weight.requires_grad_(False)  # frozen weight, trainable bias
    unused = net[3]  # never called: zero contribution

    def loss(m: nn.Module, x: Tensor) -> Tensor:
        return m[2](m[1](m[0](x))).pow(2).sum(1)

    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    params, grads = _reference(copy.deepcopy(net), x, loss)
    ones = torch.ones(5, dtype=torch.float64)
    engine, sq_norms, summed, _ = _engine_outputs(net, x, loss, ones, engine_cls)
    assert all(p is not net[0].weight for p in engine.params)
    ref_sq = torch.stack([sum((g**2).sum() for g in gi) for gi in grads])
    assert _rel(sq_norms, ref_sq) < 1e-10
    assert net[0].weight not in summed and unused.weight not in summed
    assert net[0].weight.grad is None
    assert _rel(summed[net[0].bias], sum(gi[0] for gi in grads)) < 1e-10
    engine.remove()


def test_unhandled_upstream_layers_get_correct_input_gradients():
    """A layer the engine does not touch (a frozen-free custom op) upstream still gets dL/dx."""
    g = torch.Generator().manual_seed(0)
    scale = nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)

    def run(m: nn.Module) -> Tensor:
        return m(x * scale).pow(2).sum()

    expected = torch.autograd.grad(run(copy.deepcopy(net)), scale)[0]
    engine = BookKeepingEngine(net)
    with engine.capturing():
        got = torch.autograd.grad(run(net), scale)[0]
    assert _rel(got, expected) < 1e-12
    engine.remove()


def test_functional_use_of_handled_weight_is_an_error():
    net = nn.Sequential(nn.Linear(4, 4)).double()
    engine = BookKeepingEngine(net)
    x = torch.randn(3, 4, dtype=torch.float64)
    with engine.capturing():
        (net(x) + F.linear(x, net[0].weight)).sum().backward()
    with pytest.raises(RuntimeError, match=r"0\.weight.*received gradient from outside"):
        engine.per_sample_squared_norms()
    engine.remove()


def test_remove_restores_module():
    net, x, loss = _case("demo_transformer")
    net.eval()
    before = net(x, x).detach()
    keys = list(net.state_dict())
    engine = BookKeepingEngine(net)
    net.train()
    with engine.capturing():
        loss(net, x).sum().backward()
    engine.remove()
    net.eval()
    assert list(net.state_dict()) == keys
    assert all("forward" not in m.__dict__ for m in net.modules())
    assert torch.equal(net(x, x).detach(), before)


def test_captured_forward_equals_original():
    """The captured layers compute the same outputs as the original ones (training mode)."""
    cases = [
        "encoder_layer",
        "mha_cross",
        "mha_weights",
        "conv2d",
        "groupnorm",
        "rmsnorm",
        "tied",
        "mha_kdim",
    ]
    for case in cases + ["hf_conv1d", "depthwise_conv2d", "conv2d_channels_last", "cls_token"]:
        net, x, _ = _case(case)
        expected = net(x)
        engine = BookKeepingEngine(net)
        with engine.capturing():
            got = net(x)
        assert _rel(got, expected) < 1e-12, case
        engine.remove()


def test_refused_and_fallback_layers_are_named():
    # BatchNorm without running statistics: batch statistics in every mode (eval-mode BatchNorm has a rule)
    batch_stats = nn.BatchNorm1d(4, track_running_stats=False)
    net = nn.Sequential(nn.Linear(4, 4), batch_stats, nn.Conv1d(4, 4, 1, groups=2), nn.LSTM(4, 4))
    assert [n for n, _ in BookKeepingEngine.unsupported_modules(net)] == ["1"]
    assert [n for n, _ in BookKeepingEngine.fallback_modules(net)] == ["3"]
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\).*GroupNorm"):
        BookKeepingEngine(net)
    del net[1]
    with pytest.warns(UserWarning, match=r"torch.func.*2 \(LSTM; parameters weight_ih_l0"):
        BookKeepingEngine(net).remove()
    assert BookKeepingEngine.unsupported_modules(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))) == []


def test_nothing_recorded_outside_capturing():
    net = nn.Sequential(nn.Linear(4, 3)).double()
    engine = BookKeepingEngine(net)
    net(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    assert engine.batch_size == 0
    assert net[0].weight.grad is not None  # ordinary training outside capture is untouched
    engine.remove()


def _one_step_update(net: nn.Module, x: Tensor, y: Tensor, precision: str) -> Tensor:
    """Parameter change of one DP-SGD step (lr=1, sigma=0, the whole batch) under ``precision``."""
    import models
    from models import Classifier, quiet_trainer

    from lightning_autodp import DPAutoStrategy

    model = Classifier(copy.deepcopy(net), lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    strategy = DPAutoStrategy(noise_multiplier=0.0, poisson_sampling=False, engine="bk")
    trainer = quiet_trainer(strategy=strategy, max_steps=1, precision=precision)
    trainer.fit(model, models.loader(x, y, batch_size=len(x)))
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


@pytest.mark.parametrize("case", ["layernorm", "transformer", "conv2d"])
def test_bf16_mixed_update_is_close_to_float32(case):
    # Under CPU autocast the captured layers compute in bfloat16; norms, clipping factors and
    # clipped sums must still be float32, so the update stays within bf16 rounding of fp32's.
    from models import make_case

    torch.manual_seed(0)
    net, x, y = make_case(case, n=16)
    fp32 = _one_step_update(net, x, y, "32-true")
    bf16 = _one_step_update(net, x, y, "bf16-mixed")
    assert fp32.norm() > 0
    assert 0 < _rel(bf16, fp32) < 2e-2


def test_norms_and_weighted_sum_are_float32_under_autocast():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5,))
    weights = torch.rand(5) + 0.5

    def loss(m: nn.Module, inputs: Tensor, bf16: bool = True) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(inputs)
        return F.cross_entropy(out.mean(1).float(), y, reduction="none")

    _, norms, summed, _ = _engine_outputs(net, x, loss, weights)
    _, ref_norms, ref_summed, _ = _engine_outputs(net, x, lambda m, i: loss(m, i, bf16=False), weights)
    assert norms.dtype == torch.float32 and norms.shape == (5,)
    assert all(g.dtype == torch.float32 and g.shape == p.shape for p, g in summed.items())
    assert set(summed) == set(ref_summed) == set(net.parameters())
    assert 0 < _rel(norms, ref_norms) < 2e-2
    for p in net.parameters():
        assert _rel(summed[p], ref_summed[p]) < 2e-2


def test_ghost_keeps_no_activations_between_its_passes():
    """The memory contract of engine='ghost': after the first backward only (B,) norms and the
    small norm-layer/bias gradients remain; every layer's (a, b) has been dropped."""
    net, x, loss = _case("encoder_layer")
    engine = GhostClippingEngine(net)
    with engine.capturing():
        total = loss(net, x).sum()
        total.backward(retain_graph=True)
    assert not engine._pending
    assert engine._records and all(not rec.weights for rec in engine._records.values())
    engine.remove()


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_shared_ids_without_batch_size_name_the_layer(engine_cls):
    """Without the micro-batch size, ids shared by the batch cannot be expanded: refuse, naming it."""
    net, x, loss = _case("shared_position_ids")
    engine = engine_cls(net)
    with pytest.raises(RuntimeError, match=r"0\.pos"), engine.capturing():
        loss(net, x).sum().backward(retain_graph=engine.needs_backward_root)
    engine.remove()


class SharedTableBias(nn.Module):
    """A linear layer applied to a (1, T, d) table shared by the batch and broadcast afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 5, 4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj(self.table)


def test_layer_seeing_another_batch_size_gets_exact_gradients_at_its_module():
    """A Linear on a (1, T, d) table shared by the batch: exact at the enclosing module, announced."""
    net = nn.Sequential(nn.Linear(4, 4), SharedTableBias()).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    grads = per_example_gradients(net, lambda m, i: m(x[i : i + 1]).pow(2).sum(), 3)
    ref = torch.stack([sum((g**2).sum() for g in gi) for gi in grads])
    engine = BookKeepingEngine(net)
    engine.expect_batch_size(3)
    announced = r"layer 1\.proj \(Linear\).*enclosing module 1 \(SharedTableBias\)"
    with pytest.warns(UserWarning, match=announced), engine.capturing():
        net(x).pow(2).sum().backward()
    sq = engine.per_sample_squared_norms()
    engine.remove()
    assert torch.allclose(sq, ref, rtol=1e-10, atol=0)


class ZeroPadded(nn.Module):
    """Zeroes the padded (all-zero) frames of ``layer``'s output in place, as Wav2Vec2's encoder does
    with its feature projection's output (``hidden_states[~mask] = 0``)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer(x)
        h[x.abs().sum(-1) == 0] = 0
        return h


@pytest.mark.parametrize("engine_cls", ENGINES)
@pytest.mark.parametrize("layer", ["linear", "per_module", "lifted"])
def test_outputs_modified_in_place_get_exact_gradients(layer, engine_cls):
    """The output of a layer rule (a Linear with a bias on ``(B, T, d)``), of a module under the
    per-module rule, or of the module a layer's parameters are lifted to, modified in place."""
    torch.manual_seed(0)
    inner = {"linear": nn.Linear(4, 4), "per_module": ScaledLayerNorm(4), "lifted": SharedTableBias()}[layer]
    net = nn.Sequential(nn.Linear(4, 4), ZeroPadded(inner), nn.Tanh(), Pool(), nn.Linear(4, 3)).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    x[0, -2:] = 0
    net[0].bias.data.zero_()  # padded frames stay all-zero up to the masked layer

    def loss(m: nn.Module, inputs: Tensor) -> Tensor:
        return m(inputs).pow(2).sum(1)

    params, grads = _reference(copy.deepcopy(net), x, loss)
    ref_sq = torch.stack([sum((g**2).sum() for g in gi) for gi in grads])
    weights = torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fallbacks' announcements
        engine, sq_norms, summed, _ = _engine_outputs(net, x, loss, weights, engine_cls)
    engine.remove()
    assert _rel(sq_norms, ref_sq) < 1e-10
    for k, p in enumerate(p for p in net.parameters() if p.requires_grad):
        assert _rel(summed[p], sum(w * gi[k] for w, gi in zip(weights, grads))) < 1e-10


class SummedOverBatch(SharedTableBias):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).sum(0)


def test_layer_without_a_per_example_enclosing_module_is_named():
    net = nn.Sequential(nn.Linear(4, 4), SummedOverBatch()).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    engine = BookKeepingEngine(net)
    engine.expect_batch_size(3)
    with (
        pytest.raises(
            RuntimeError, match=r"layer 1 \(SummedOverBatch\) sees rows that are not one per example"
        ),
        engine.capturing(),
    ):
        net(x).sum().backward()
    engine.remove()


class NoisyScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(x * self.scale)


def test_per_module_rule_refuses_a_module_that_is_not_per_example():
    """Dropout inside a module under the torch.func rule: recomputation differs, so refuse."""
    net = nn.Sequential(nn.Linear(4, 4), NoisyScale()).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    engine = BookKeepingEngine(net)
    engine.expect_batch_size(6)
    with (
        pytest.raises(
            RuntimeError, match=r"1 \(NoisyScale; parameters scale\) does not compute each example"
        ),
        engine.capturing(),
    ):
        net(x).sum().backward()
    engine.remove()


def test_rule_lookup_follows_the_mro_and_refuses_overridden_forwards():
    from lightning_autodp.engines.rule import find_rule

    assert find_rule(PlainLayerNorm(4)) is find_rule(nn.LayerNorm(4)) is not None
    rule = find_rule(ScaledLayerNorm(4))
    assert rule is not None and "overrides" in (rule.unsupported_reason(ScaledLayerNorm(4)) or "")
    net = nn.Sequential(PlainLayerNorm(4), ScaledLayerNorm(4), nn.Conv2d(2, 2, 3, groups=2))
    assert [n for n, _ in BookKeepingEngine.fallback_modules(net)] == ["1"]


def test_engine_announces_the_per_module_rule():
    from lightning_autodp.engines import make_engine

    net, _, _ = _case("layernorm_subclass_forward")
    with pytest.warns(
        UserWarning, match=r"engine='bk'.*torch\.func.*1 \(ScaledLayerNorm; parameters weight, bias\)"
    ):
        engine = make_engine("auto", net)
    assert isinstance(engine, BookKeepingEngine)
    engine.remove()


def test_llama_rmsnorm_gets_the_one_backward_rule_only_with_its_exact_forward():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    class Shifted(LlamaRMSNorm):  # same class family, other math: must not get the rule
        def forward(self, hidden_states):
            return super().forward(hidden_states) + 1.0

    net = nn.Sequential(LlamaRMSNorm(4), Qwen2RMSNorm(4), Shifted(4))
    assert [n for n, _ in BookKeepingEngine.fallback_modules(net)] == ["2"]


def _phi3_falcon(shifted: bool) -> nn.Module:
    """Phi-3's RMSNorm and Falcon's FalconLinear (with and without bias), or subclasses with other math."""
    from transformers.models.falcon.modeling_falcon import FalconLinear
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    class ShiftedNorm(Phi3RMSNorm):
        def forward(self, hidden_states: Tensor) -> Tensor:
            return super().forward(hidden_states) + hidden_states

    class DoubledLinear(FalconLinear):
        def forward(self, input: Tensor) -> Tensor:
            return super().forward(input) * 2.0

    norm, linear = (ShiftedNorm, DoubledLinear) if shifted else (Phi3RMSNorm, FalconLinear)
    torch.manual_seed(0)
    net = nn.Sequential(linear(4, 6), _randomized(norm(6)), nn.Tanh(), linear(6, 3, bias=False))
    return net.double()


def test_phi3_rmsnorm_and_falcon_linear_get_the_layer_rules_only_with_their_exact_forward():
    assert not BookKeepingEngine.fallback_modules(_phi3_falcon(shifted=False))
    assert [n for n, _ in BookKeepingEngine.fallback_modules(_phi3_falcon(shifted=True))] == ["0", "1", "3"]


@pytest.mark.parametrize("shifted", [False, True], ids=["exact_forward", "other_forward"])
def test_phi3_rmsnorm_and_falcon_linear_match_the_per_example_loop(shifted, monkeypatch):
    """The layer rules on the classes' own forward, the per-module rule on subclasses with other math:
    exact. The mutation (the forward's check dropped, every such class gets the layer rule) is caught on
    the subclasses."""
    from lightning_autodp.engines.rules.hf_rmsnorm import LlamaRMSNormRule
    from lightning_autodp.engines.rules.linear import FalconLinearRule

    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss = lambda m, xs: m(xs).pow(2).sum((1, 2))  # noqa: E731
    weights = torch.rand(5, dtype=torch.float64) + 0.5

    def errors() -> tuple[float, float]:
        net = _phi3_falcon(shifted)
        params, grads = _reference(copy.deepcopy(net), x, loss)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            engine, sq, summed, _ = _engine_outputs(net, x, loss, weights)
        engine.remove()
        ref_sq = torch.stack([sum((g**2).sum() for g in gi) for gi in grads])
        got = torch.cat([summed[p].flatten() for p in net.parameters()])
        expected = torch.cat(
            [sum(w * gi[k] for w, gi in zip(weights, grads)).flatten() for k in range(len(params))]
        )
        return _rel(sq, ref_sq), _rel(got, expected)

    assert max(errors()) < 1e-10
    for rule in (LlamaRMSNormRule, FalconLinearRule):
        monkeypatch.setattr(rule, "unsupported_reason", lambda self, module: None)
    if shifted:
        assert min(errors()) > 1e-3
    else:
        assert max(errors()) < 1e-10


def test_contribution_math_against_explicit_per_example_gradients():
    """The shared math alone (no module, no Lightning): ghost norms with cross terms, row blocks,
    one-hot factors, materialisation by cost and weighted sums vs per-example gradients."""
    from lightning_autodp.engines.contributions import (
        Contribution,
        squared_norms_of_weight,
        weighted_sum_of_weight,
    )

    g = torch.Generator().manual_seed(0)
    b, rows, cols = 4, 6, 5
    param = nn.Parameter(torch.zeros(rows, cols, dtype=torch.float64))
    dense = Contribution(torch.randn(b, 3, rows, generator=g, dtype=torch.float64),
                         torch.randn(b, 3, cols, generator=g, dtype=torch.float64))  # fmt: skip
    long_t = Contribution(torch.randn(b, 40, rows, generator=g, dtype=torch.float64),
                          torch.randn(b, 40, cols, generator=g, dtype=torch.float64))  # fmt: skip
    ids = Contribution(
        torch.randint(0, rows, (b, 7), generator=g), torch.randn(b, 7, cols, generator=g).double()
    )
    block = Contribution(torch.randn(b, 2, 2, generator=g, dtype=torch.float64),
                         torch.randn(b, 2, cols, generator=g, dtype=torch.float64), rows=(2, 4))  # fmt: skip
    weights = torch.rand(b, generator=g, dtype=torch.float64)

    def explicit(c: Contribution) -> Tensor:
        left = F.one_hot(c.left, rows).double() if c.index else c.left
        full = torch.zeros(b, rows, cols, dtype=torch.float64)
        r = c.rows or (0, rows)
        full[:, r[0] : r[1]] = torch.einsum("btr,btc->brc", left, c.right)
        return full

    for group in ([dense], [long_t], [ids], [dense, long_t, ids], [block], [dense, block]):
        per_example = sum(explicit(c) for c in group)
        assert _rel(squared_norms_of_weight(param, group), per_example.pow(2).sum((1, 2))) < 1e-12
        expected = torch.einsum("b,brc->rc", weights, per_example)
        assert _rel(weighted_sum_of_weight(param, group, weights), expected) < 1e-12


def test_infer_batch_size():
    from lightning_autodp.engines import infer_batch_size

    assert infer_batch_size((torch.zeros(3, 2), torch.zeros(3))) == 3
    assert infer_batch_size({"input_ids": torch.zeros(5, 4), "mask": [torch.zeros(5)]}) == 5
    assert infer_batch_size({"ids": torch.zeros(5, 4), "positions": torch.zeros(1, 4)}) is None
    assert infer_batch_size([1, "a"]) is None


# ---------------------------------------------------------------------- parameters used directly


class DirectProjection(nn.Module):
    """Passes a child Linear's weight and bias to ``F.linear`` instead of calling it (as WavLM's attention
    passes its projections' weights to ``F.multi_head_attention_forward``), and calls another child."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(F.linear(x, self.q.weight, self.q.bias)))


class CalledAndDirect(DirectProjection):
    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.q(x) + F.linear(x, self.q.weight))


def _direct_case(block: type[nn.Module] = DirectProjection) -> tuple[nn.Module, Tensor, LossFn]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), block(), Pool(), nn.Linear(4, 3)).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    return net, x, lambda m, inputs: m(inputs).pow(2).sum(1)


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_parameters_a_module_uses_directly_get_exact_gradients_at_that_module(engine_cls):
    """Found in the first captured forward and announced once, naming the layer, the module and the
    function; the second step watches only that module and is exact too."""
    net, x, loss = _direct_case()
    _, grads = _reference(copy.deepcopy(net), x, loss)
    params = [p for p in net.parameters() if p.requires_grad]
    ref_sq = torch.stack([sum((g**2).sum() for g in gi) for gi in grads])
    weights = torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    announced = (
        r"layer 1\.q \(Linear\): 1 \(DirectProjection\) uses its parameters directly \(weight in F\.linear, "
        r"bias in F\.linear\), not through its forward; its per-example gradients are computed exactly with "
        r"torch\.func on the enclosing module 1 \(DirectProjection\)"
    )
    engine = engine_cls(net)
    for step in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, sq_norms, summed, _ = _engine_outputs(net, x, loss, weights, lambda _: engine)
        messages = [str(w.message) for w in caught if "dp_auto" in str(w.message)]
        if step == 0:
            assert len(messages) == 1 and re.search(announced, messages[0])
        else:
            assert not messages
        assert _rel(sq_norms, ref_sq) < 1e-10
        for k, p in enumerate(params):
            assert _rel(summed[p], sum(w * gi[k] for w, gi in zip(weights, grads))) < 1e-10
        assert net[1].q.weight.grad is None  # autograd never formed the non-private gradient
    engine.remove()


class ReadsItsLayer(DirectProjection):
    """Reads a layer's weight without putting it in the graph (its shape, tensors like it) and calls it."""

    def forward(self, x: Tensor) -> Tensor:
        zero = torch.zeros_like(self.q.weight).sum() + self.q.weight.detach().sum() * 0
        return self.out(self.q(x) * self.q.weight.shape[0] + zero + self.q.weight.new_zeros(()))


def test_reading_a_layers_weight_is_not_a_direct_use():
    net, x, loss = _direct_case(ReadsItsLayer)
    _, grads = _reference(copy.deepcopy(net), x, loss)
    ref_sq = torch.stack([sum((g**2).sum() for g in gi) for gi in grads])
    weights = torch.ones(3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, sq_norms, _, _ = _engine_outputs(net, x, loss, weights)
    engine.remove()
    assert not [w for w in caught if "dp_auto" in str(w.message)]
    assert _rel(sq_norms, ref_sq) < 1e-10


def test_a_direct_use_left_unwatched_is_refused_after_backward(monkeypatch):
    """The mutation: nothing watches the forward, the direct use reaches the parameters' autograd
    gradient, and the engine refuses before any update, naming them."""
    from lightning_autodp.engines import lift

    def unwatched(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))

    monkeypatch.setattr(lift.DirectUses, "__torch_function__", unwatched)
    net, x, loss = _direct_case()
    engine = BookKeepingEngine(net)
    engine.expect_batch_size(3)
    with engine.capturing():
        loss(net, x).sum().backward()
    with pytest.raises(
        RuntimeError, match=r"\['1\.q\.bias', '1\.q\.weight'\] also received gradient from outside"
    ):
        engine.per_sample_squared_norms()
    engine.remove()


def test_a_layer_both_called_and_used_directly_in_one_module_is_refused():
    net, x, loss = _direct_case(CalledAndDirect)
    engine = BookKeepingEngine(net)
    engine.expect_batch_size(3)
    refused = (
        r"1\.q \(Linear\) are used inside 1 \(CalledAndDirect\) both with rows that are one per example and "
        r"with rows that are not \(1\.q \(Linear\): 1 \(CalledAndDirect\) uses its parameters directly "
        r"\(weight in F\.linear\), not through its forward\)"
    )
    with pytest.raises(RuntimeError, match=refused), engine.capturing():
        loss(net, x).sum().backward()
    engine.remove()


class ZeroesItsInput(SharedTableBias):
    """Zeroes the padded frames of its input in place, as WavLM's encoder does (``hidden_states[~mask] =
    0``) before the layers whose parameters it receives; here the Linear on a table shared by the batch."""

    def forward(self, x: Tensor) -> Tensor:
        x[x.abs().sum(-1) == 0] = 0
        return super().forward(x)


def _input_modified_in_place(engine_cls) -> tuple[float, float]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), ZeroesItsInput(), nn.Tanh(), Pool(), nn.Linear(4, 3)).double()
    net[0].bias.data.zero_()  # padded frames stay all-zero up to the module
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    x[0, -2:] = 0

    def loss(m: nn.Module, inputs: Tensor) -> Tensor:
        return m(inputs).pow(2).sum(1)

    _, grads = _reference(copy.deepcopy(net), x, loss)
    params = [p for p in net.parameters() if p.requires_grad]
    ref_sq = torch.stack([sum((g**2).sum() for g in gi) for gi in grads])
    weights = torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fallbacks' announcements
        engine, sq_norms, summed, _ = _engine_outputs(net, x, loss, weights, engine_cls)
    engine.remove()
    sums = max(_rel(summed[p], sum(w * gi[k] for w, gi in zip(weights, grads))) for k, p in enumerate(params))
    return _rel(sq_norms, ref_sq), sums


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_a_module_that_modifies_its_input_in_place_is_recomputed_on_a_copy(engine_cls, monkeypatch):
    """Its own parameter (per-module rule) and the lifted Linear (enclosing-module rule) are recomputed
    per example on copies of its inputs. The mutation (no copy) fails in torch.func."""
    norms, sums = _input_modified_in_place(engine_cls)
    assert norms < 1e-10 and sums < 1e-10
    monkeypatch.setattr(module_rule, "_example_input", lambda t, batched: t.unsqueeze(0) if batched else t)
    with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
        _input_modified_in_place(engine_cls)
