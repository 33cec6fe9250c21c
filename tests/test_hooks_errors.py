"""engine='hooks': every failure of Opacus's hooks is an error of this package naming the layer and the fix.

Each model below makes Opacus raise its own exception; the same model trains exactly under
engine='auto', which the message recommends.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import Classifier, loader, quiet_trainer
from opacus.grad_sample import GradSampleModule
from reference import per_example_gradients, reference_clipped_mean
from torch import nn

from lightning_autodp import DPAutoStrategy
from lightning_autodp.engines import hooks
from lightning_autodp.engines.hooks import HooksEngine, HooksEngineError

USE_AUTO = (
    "Use engine='auto' (the default): it computes exact per-example gradients of every layer from one "
    "backward pass, without Opacus's hooks, and falls back to an exact torch.func rule for layers it has "
    "no rule for."
)


class Scale(nn.Module):
    """A layer with a parameter of its own, called with a positional int."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x, power):
        return x * self.weight**power


class IntArgument(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = Scale()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.scale(x, 2)))


class Buffered(nn.Module):
    """A layer with a parameter and a buffer (a fixed per-feature scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.register_buffer("scale", torch.linspace(2.0, 1.0, 4))

    def forward(self, x):
        return torch.tanh(x * self.weight * self.scale)


class Gate(nn.Module):
    """A layer with a parameter and two tensor inputs: Opacus's functorch rule replays only the first."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x, gate):
        return x * torch.sigmoid(gate * self.weight)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.gate(x, x.flip(-1)))


def _in_place_relu() -> nn.Module:
    """The in-place activation right after a hooked layer, as in timm's and torchvision's backbones."""
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 3))


MODELS = {
    "int_argument": IntArgument,
    "buffers": lambda: nn.Sequential(Buffered(), nn.Linear(4, 3)),
    "two_inputs": TwoInputs,
    "in_place_relu": _in_place_relu,
}

MESSAGES = {
    "int_argument": (
        "engine='hooks' failed on layer 'net.scale' (Scale): Opacus's per-sample gradient hooks raised "
        "AttributeError: 'int' object has no attribute 'detach'. Opacus stores every positional input of a "
        "hooked layer as a tensor, and this layer was called with a positional int. " + USE_AUTO
    ),
    "buffers": (
        "engine='hooks' failed on layer 'net.0' (Buffered): Opacus's per-sample gradient hooks raised "
        "NotImplementedError: This layer has buffers and is not supported by Opacus. Opacus has no "
        "per-sample rule for this layer's type, and its generic functorch rule refuses layers that hold "
        "buffers. " + USE_AUTO
    ),
    "in_place_relu": (
        "engine='hooks' failed on layer 'net.0' (Linear): an in-place operation (e.g. nn.ReLU(inplace=True) "
        "or `x += ...`) modified the output of a layer hooked by Opacus, which its backward hooks make a "
        "view that autograd forbids modifying in place (torch: 'Output 0 of BackwardHookFunction is a view "
        "and is being modified inplace'). The layer named is the last hooked layer that ran before the "
        "failing operation. Making the operation out of place (inplace=False) also avoids it. " + USE_AUTO
    ),
}

#: what Opacus (or torch) raised: the cause the error is chained to
CAUSES = {
    "int_argument": (AttributeError, "'int' object has no attribute 'detach'"),
    "buffers": (NotImplementedError, "This layer has buffers"),
    "two_inputs": (TypeError, "missing 1 required positional argument"),
    "in_place_relu": (RuntimeError, "Output 0 of BackwardHookFunction is a view"),
}


def _data(n: int = 8):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _fit(net: nn.Module, engine: str, verify: bool = True) -> Classifier:
    model = Classifier(net)
    strategy = DPAutoStrategy(
        noise_multiplier=0.0,
        clipping="abadi",
        max_grad_norm=0.1,
        poisson_sampling=False,
        engine=engine,
        verify=verify,
    )
    x, y = _data()
    quiet_trainer(strategy=strategy, precision="64-true", max_steps=1).fit(model, loader(x, y, batch_size=8))
    return model


def _assert_hooks_error(err: HooksEngineError, name: str) -> None:
    if name in MESSAGES:
        assert str(err) == MESSAGES[name]
    cause_type, cause_text = CAUSES[name]
    assert isinstance(err.__cause__, cause_type) and cause_text in str(err.__cause__)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("name", list(MODELS))
def test_opacus_failures_are_errors_naming_the_layer(name, verify):
    """Through the Trainer: raised at setup, in verification, or in the step when verification is off."""
    torch.manual_seed(0)
    net = MODELS[name]().double()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(HooksEngineError) as info:
        _fit(net, "hooks", verify=verify)
    _assert_hooks_error(info.value, name)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing was updated


def test_backward_hook_failure_names_the_layer():
    """The rule that fails in Opacus's backward hook (its functorch rule replays one input of two)."""
    torch.manual_seed(0)
    net = TwoInputs().double()
    with pytest.raises(HooksEngineError) as info:
        _fit(net, "hooks")
    assert str(info.value).startswith(
        "engine='hooks' failed on layer 'net.gate' (Gate): Opacus's per-sample gradient hooks raised "
        "TypeError: "
    )
    assert str(info.value).endswith(USE_AUTO)
    _assert_hooks_error(info.value, "two_inputs")


def test_engine_alone_names_the_layer():
    """Without the strategy: the engine's capture translates the in-place error itself."""
    net = _in_place_relu()
    engine = HooksEngine(net)
    expected = r"^engine='hooks' failed on layer '0' \(Linear\): an in-place"
    with pytest.raises(HooksEngineError, match=expected), engine.capturing():
        net(torch.randn(3, 4)).sum().backward()
    engine.remove()


def test_failed_attachment_leaves_no_hooks_on_the_model():
    """Opacus attached hooks to the layers before the one it refused: they are removed again."""
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), Buffered(), nn.Linear(4, 3))
    with pytest.raises(HooksEngineError, match=r"on layer '2' \(Buffered\)"):
        HooksEngine(net)
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())
    net(torch.randn(3, 4, requires_grad=True)).sum().backward()  # the in-place ReLU works again


def test_without_the_translation_opacus_errors_reach_the_user(monkeypatch):
    """Mutation: Opacus's own hook (no wrapper) is still caught by the traceback check; without both,
    Opacus's AttributeError reaches the user and the tests above fail."""
    monkeypatch.setattr(
        hooks._InPlaceGradSampleModule, "capture_activations_hook", GradSampleModule.capture_activations_hook
    )
    with pytest.raises(HooksEngineError) as info:
        _fit(IntArgument().double(), "hooks")
    assert str(info.value).startswith("engine='hooks' failed: Opacus's per-sample gradient hooks raised ")
    monkeypatch.setattr(hooks, "_raised_in_opacus", lambda err: False)
    with pytest.raises(AttributeError, match="'int' object has no attribute 'detach'"):
        _fit(IntArgument().double(), "hooks")


@pytest.mark.parametrize("name", list(MODELS))
def test_the_recommended_engine_trains_these_models_exactly(name):
    """engine='auto', which each message recommends, gives the per-example loop's clipped mean."""
    torch.manual_seed(0)
    net = MODELS[name]().double()
    x, y = _data()
    reference = copy.deepcopy(net)

    def loss_i(m, i):
        return F.cross_entropy(m(x[i : i + 1]), y[i : i + 1])

    grads = per_example_gradients(reference, loss_i, len(x))
    expected = reference_clipped_mean(grads, "abadi", 0.1, 0.01, batch_size=len(x))
    before = [p.detach().clone() for p in net.parameters()]
    _fit(net, "auto")
    for b, p, e in zip(before, net.parameters(), expected):
        update = b - p.detach()
        assert (update - e).norm() / e.norm() < 1e-5


def test_trainable_layer_in_eval_mode_is_named():
    """Opacus records inputs in train mode only: a trainable layer left in eval mode fails in backward."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    net[0].eval()
    engine = HooksEngine(net)
    with pytest.raises(HooksEngineError) as info, engine.capturing():
        net(torch.randn(3, 4)).sum().backward()
    engine.remove()
    assert str(info.value) == (
        "engine='hooks' failed on layer '0' (Linear): Opacus's per-sample gradient hooks raised ValueError: "
        "No activations detected for <class 'torch.nn.modules.linear.Linear'>, run forward after "
        "add_hooks(model). Opacus records a layer's inputs only in train mode, and this layer has trainable "
        "parameters but ran in eval mode. " + USE_AUTO
    )
