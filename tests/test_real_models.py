"""transformers models whose layers the layer rules cover (tiny random configs, full and LoRA) against a
per-example loop: GPT-2, BERT, RoBERTa, DistilBERT, Llama, Mistral, Qwen2, Qwen3, Phi-3, GPT-NeoX, Falcon,
BLOOM, ViT and CLIP's vision tower.

Each example alone through the model, its own backward, in float64: the engines' per-example norms
and weighted sums, and one DP-SGD step of a Lightning fit (sigma = 0), must match it. Every layer but
ViT's and CLIP's class token and positions gets a layer rule (nothing else is announced).
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from hf_lightning import lightning_step_error, max_relative_error
from hf_models import FAMILIES, build, example, warnings_per_step
from reference import per_example_gradients
from torch import Tensor, nn

from lightning_autodp.engines import make_engine

pytest.importorskip("transformers")
pytest.importorskip("peft")


def _reference(model: nn.Module, batch: dict, loss) -> list[list[Tensor]]:
    n = len(next(iter(batch.values())))
    return per_example_gradients(model, lambda m, i: loss(m, example(batch, i)).sum(), n)


@pytest.mark.parametrize("engine_name", ["bk", "ghost", "auto"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_norms_and_weighted_sum_match_per_example_loop(family, lora, engine_name):
    model, batch, loss = build(family, lora)
    n = len(next(iter(batch.values())))
    grads = _reference(copy.deepcopy(model), batch, loss)
    ref_sq = torch.stack([sum((g**2).sum() for g in gi) for gi in grads])
    weights = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the per-module rule's announcement
        engine = make_engine(engine_name, model)
    engine.expect_batch_size(n)
    with engine.capturing():
        total = loss(model, batch).sum()
        total.backward(retain_graph=engine.needs_backward_root)
    engine.set_backward_root(total)
    sq = engine.per_sample_squared_norms()
    summed: dict[nn.Parameter, Tensor] = {}
    engine.accumulate_weighted_sum(weights, summed)
    assert engine.batch_size == n
    engine.remove()

    assert float((sq - ref_sq).norm() / ref_sq.norm()) < 1e-10
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(grads[0])
    got = [summed.get(p, torch.zeros_like(p)) for p in params]
    expected = [sum(w * gi[k] for w, gi in zip(weights, grads)) for k in range(len(params))]
    assert max_relative_error(got, expected) < 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_lightning_step_matches_per_example_loop(family):
    """One DP-SGD step (sigma = 0, AUTO-S) of a Lightning fit with engine='auto' on a dict batch."""
    model, batch, loss = build(family)
    assert lightning_step_error(model, batch, loss) < 1e-6  # p - (p - u) loses digits where u << p


#: the fallbacks each family announces at the engine's construction (the per-module rule), full fine-tune;
#: every other family, and every family with LoRA, announces nothing
ANNOUNCED = {
    "vit": r"vit\.embeddings \(ViTEmbeddings; parameters cls_token, position_embeddings\): no layer rule",
    "clip": r"vision_model\.embeddings \(CLIPVisionEmbeddings; parameters class_embedding\): no layer rule",
}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_rules_capture_every_layer_but_the_announced_ones(family, lora):
    """Two steps: nothing is handed to a torch.func rule but the announced class token and positions
    (Phi-3's RMSNorm and Falcon's FalconLinear get the layer rules of their Llama and nn.Linear twins)."""
    model, batch, loss = build(family, lora)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = make_engine("bk", model)
        steps = warnings_per_step(engine, model, batch, loss)
        engine.remove()
    announced = [m for m in [str(w.message) for w in caught] + sum(steps, []) if "dp_auto" in m]
    expected = None if lora else ANNOUNCED.get(family)
    if expected is None:
        assert not announced
    else:
        assert len(announced) == 1 and re.search(expected, announced[0])
