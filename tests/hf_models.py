"""Tiny random-config transformers models (GPT-2, BERT, Llama, ViT), full fine-tune or peft LoRA.

Each case gives a model (float64, dropout 0), a batch (a dict of tensors, as a transformers
collator makes) and the per-example losses ``(B,)`` of a batch, so that tests can compare an
engine with a per-example loop (each example alone through the model, its own backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FAMILIES = ("gpt2", "bert", "llama", "vit")
VOCAB, T, CLASSES = 40, 6, 3

Batch = dict[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]


def _lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Next-token cross-entropy, mean over each example's tokens: ``(B,)``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"][:, 1:]
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none").mean(1)


def _cls_loss(model: nn.Module, batch: Batch) -> Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**inputs).logits, batch["labels"], reduction="none")


def build(family: str, lora: bool = False, n: int = 4, seed: int = 0) -> tuple[nn.Module, Batch, LossFn]:
    """``(model, batch, per_example_loss)`` for one family; ``lora`` wraps it in a peft adapter."""
    import transformers as tf

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    small = dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=32)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[0, -2:] = 0  # one padded example: attention masks must stay per example
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    if family == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model, targets = tf.GPT2LMHeadModel(cfg), ["c_attn"]
        batch, loss = {"input_ids": ids, "attention_mask": mask}, _lm_loss
    elif family == "bert":
        cfg = tf.BertConfig(
            vocab_size=VOCAB, max_position_embeddings=16, num_labels=CLASSES, **small, **no_dropout
        )
        model, targets = tf.BertForSequenceClassification(cfg), ["query", "value"]
        batch, loss = {"input_ids": ids, "attention_mask": mask, "labels": labels}, _cls_loss
    elif family == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=16, num_key_value_heads=1, **small)
        model, targets = tf.LlamaForCausalLM(cfg), ["q_proj", "v_proj"]
        batch, loss = {"input_ids": ids, "attention_mask": mask}, _lm_loss
    elif family == "vit":
        cfg = tf.ViTConfig(
            image_size=8, patch_size=4, num_channels=3, num_labels=CLASSES, **small, **no_dropout
        )
        model, targets = tf.ViTForImageClassification(cfg), ["q_proj", "v_proj"]
        pixels = torch.randn(n, 3, 8, 8, generator=g)
        batch, loss = {"pixel_values": pixels, "labels": labels}, _cls_loss
    else:
        raise KeyError(family)
    model = model.double()
    if family == "vit":  # the class token and position embeddings start at zero / tiny in ViT's init
        with torch.no_grad():
            model.vit.embeddings.cls_token.normal_(generator=g)
            model.vit.embeddings.position_embeddings.normal_(generator=g)
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets,
            fan_in_fan_out=family == "gpt2", init_lora_weights=False,
        )  # fmt: skip
        model = get_peft_model(model, config)
    model.train()
    return model, batch, loss


def example(batch: Batch, i: int) -> Batch:
    """Example ``i`` of ``batch`` alone, as a batch of one."""
    return {k: v[i : i + 1] for k, v in batch.items()}
