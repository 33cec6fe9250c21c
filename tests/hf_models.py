"""Tiny random-config transformers models (text, vision, speech), full fine-tune or peft LoRA.

Each case gives a model (float64, dropout 0), a batch (a dict of tensors, as a transformers
collator makes) and the per-example losses ``(B,)`` of a batch, so that tests can compare an
engine with a per-example loop (each example alone through the model, its own backward).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FAMILIES = (
    "gpt2", "bert", "llama", "vit", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "falcon", "bloom",
    "roberta", "distilbert", "clip",
)  # fmt: skip
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
    elif family == "mistral":  # a sliding window shorter than the sequence
        cfg = tf.MistralConfig(
            vocab_size=VOCAB, max_position_embeddings=16, num_key_value_heads=1, head_dim=8, sliding_window=4,
            **small,
        )  # fmt: skip
        model, targets = tf.MistralForCausalLM(cfg), ["q_proj", "v_proj"]
        batch, loss = {"input_ids": ids, "attention_mask": mask}, _lm_loss
    elif family == "qwen2":  # biases on q/k/v
        cfg = tf.Qwen2Config(vocab_size=VOCAB, max_position_embeddings=16, num_key_value_heads=1, **small)
        model, targets = tf.Qwen2ForCausalLM(cfg), ["q_proj", "v_proj"]
        batch, loss = {"input_ids": ids, "attention_mask": mask}, _lm_loss
    elif family == "qwen3":  # RMSNorm on each head's queries and keys
        cfg = tf.Qwen3Config(
            vocab_size=VOCAB, max_position_embeddings=16, num_key_value_heads=1, head_dim=8, **small
        )
        model, targets = tf.Qwen3ForCausalLM(cfg), ["q_proj", "v_proj"]
        batch, loss = {"input_ids": ids, "attention_mask": mask}, _lm_loss
    elif family == "phi3":  # fused qkv_proj and gate_up_proj
        cfg = tf.Phi3Config(
            vocab_size=VOCAB, max_position_embeddings=16, original_max_position_embeddings=16,
            num_key_value_heads=1, pad_token_id=0, bos_token_id=0, eos_token_id=0, **small,
        )  # fmt: skip
        model, targets = tf.Phi3ForCausalLM(cfg), ["qkv_proj"]
        batch, loss = {"input_ids": ids, "attention_mask": mask}, _lm_loss
    elif family == "gpt_neox":  # fused query_key_value, partial rotary, parallel residual
        cfg = tf.GPTNeoXConfig(
            vocab_size=VOCAB, max_position_embeddings=16, rotary_pct=0.5, hidden_dropout=0.0,
            attention_dropout=0.0, **small,
        )  # fmt: skip
        model, targets = tf.GPTNeoXForCausalLM(cfg), ["query_key_value"]
        batch, loss = {"input_ids": ids, "attention_mask": mask}, _lm_loss
    elif family == "falcon":  # multi-query attention, parallel attention, lm_head tied to the embedding
        cfg = tf.FalconConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0,
            eos_token_id=0,
        )  # fmt: skip
        model, targets = tf.FalconForCausalLM(cfg), ["query_key_value"]
        batch, loss = {"input_ids": ids, "attention_mask": mask}, _lm_loss
    elif family == "bloom":  # ALiBi, a LayerNorm on the embeddings, lm_head tied to the embedding
        cfg = tf.BloomConfig(
            vocab_size=VOCAB, hidden_size=16, n_layer=2, n_head=2, hidden_dropout=0.0, attention_dropout=0.0,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model, targets = tf.BloomForCausalLM(cfg), ["query_key_value"]
        batch, loss = {"input_ids": ids, "attention_mask": mask}, _lm_loss
    elif family == "roberta":  # positions counted from the padding index
        cfg = tf.RobertaConfig(
            vocab_size=VOCAB, max_position_embeddings=16, num_labels=CLASSES, **small, **no_dropout
        )
        model, targets = tf.RobertaForSequenceClassification(cfg), ["query", "value"]
        batch, loss = {"input_ids": ids, "attention_mask": mask, "labels": labels}, _cls_loss
    elif family == "distilbert":
        cfg = tf.DistilBertConfig(
            vocab_size=VOCAB, max_position_embeddings=16, n_layers=2, n_heads=2, dim=16, hidden_dim=32,
            dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=CLASSES,
        )  # fmt: skip
        model, targets = tf.DistilBertForSequenceClassification(cfg), ["q_lin", "v_lin"]
        batch, loss = {"input_ids": ids, "attention_mask": mask, "labels": labels}, _cls_loss
    elif family == "clip":  # the vision tower and a classifier on its mean patch state
        cfg = tf.CLIPConfig(
            vision_config=dict(
                image_size=8, patch_size=4, num_channels=3, hidden_size=16, intermediate_size=32,
                num_hidden_layers=2, num_attention_heads=2,
            ),
            text_config=dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=16),
            num_labels=CLASSES,
        )  # fmt: skip
        model, targets = tf.CLIPForImageClassification(cfg), ["q_proj", "v_proj"]
        pixels = torch.randn(n, 3, 8, 8, generator=g)
        batch, loss = {"pixel_values": pixels, "labels": labels}, _cls_loss
    else:
        raise KeyError(family)
    model = model.double()
    if family == "vit":  # the class token and position embeddings start at zero / tiny in ViT's init
        with torch.no_grad():
            model.vit.embeddings.cls_token.normal_(generator=g)
            model.vit.embeddings.position_embeddings.normal_(generator=g)
    model, batch = _float64_batch_and_adapter(model, batch, targets if lora else None, family == "gpt2")
    return model, batch, loss


def _float64_batch_and_adapter(
    model: nn.Module, batch: Batch, lora_targets: list[str] | None, fan_in_fan_out: bool = False
) -> tuple[nn.Module, Batch]:
    """``batch`` in float64, a peft LoRA adapter on ``lora_targets`` (None: none), the model in train mode."""
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    if lora_targets is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=2, lora_alpha=4, lora_dropout=0.0, target_modules=lora_targets,
            fan_in_fan_out=fan_in_fan_out, init_lora_weights=False,
        )  # fmt: skip
        model = get_peft_model(model, config)
    model.train()
    return model, batch


def warnings_per_step(
    engine, model: nn.Module, batch: Batch, loss: LossFn, steps: int = 2
) -> list[list[str]]:
    """The messages of the warnings each of ``steps`` captured steps raises (forward, backward and the
    per-example norms, which refuse a gradient that escaped the engine), one list per step."""
    n = len(next(iter(batch.values())))
    per_step = []
    for _ in range(steps):
        engine.expect_batch_size(n)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with engine.capturing():
                loss(model, batch).sum().backward()
            engine.per_sample_squared_norms()
        engine.reset()
        per_step.append([str(w.message) for w in caught])
    return per_step


def example(batch: Batch, i: int) -> Batch:
    """Example ``i`` of ``batch`` alone, as a batch of one."""
    return {k: v[i : i + 1] for k, v in batch.items()}


# ------------------------------------------------------------------ models whose layers need the fallbacks

#: families whose layers see rows that are not one per example, share weights across rules, or
#: carry parametrised weights (see docs/how-to/models.md)
MORE_FAMILIES = ("t5", "gemma", "swin", "opt", "mixtral", "whisper", "wav2vec2", "wavlm", "deberta_v2")


def _seq2seq_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Teacher-forced cross-entropy of the decoder, mean over each example's target tokens: ``(B,)``."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
    )
    return F.cross_entropy(out.logits.transpose(1, 2), batch["labels"], reduction="none").mean(1)


def _whisper_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Teacher-forced cross-entropy of Whisper's decoder on log-mel features: ``(B,)``."""
    out = model(
        input_features=batch["input_features"],
        decoder_input_ids=batch["decoder_input_ids"],
        decoder_attention_mask=batch["decoder_attention_mask"],
    )
    return F.cross_entropy(out.logits.transpose(1, 2), batch["labels"], reduction="none").mean(1)


def _ctc_loss(model: nn.Module, batch: Batch) -> Tensor:
    """CTC loss of a Wav2Vec2ForCTC or WavLMForCTC on raw waveforms, per target token (blank = pad = 0):
    ``(B,)``."""
    mask = batch["attention_mask"]
    logits = model(input_values=batch["input_values"], attention_mask=mask).logits
    frames = model.base_model._get_feat_extract_output_lengths(mask.sum(-1)).long()
    targets = batch["labels"]
    lengths = torch.full((len(targets),), targets.shape[1], dtype=torch.long)
    log_probs = F.log_softmax(logits, -1).transpose(0, 1)
    return F.ctc_loss(log_probs, targets, frames, lengths, blank=0, reduction="none") / lengths


def build_more(family: str, lora: bool = False, n: int = 4, seed: int = 0) -> tuple[nn.Module, Batch, LossFn]:
    """``(model, batch, per_example_loss)`` for one of :data:`MORE_FAMILIES` (float64, dropout 0)."""
    import transformers as tf

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[0, -2:] = 0
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    lm = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        cfg = tf.T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0,
        )  # fmt: skip
        model, targets = tf.T5ForConditionalGeneration(cfg), ["q", "v"]
        target = torch.randint(1, VOCAB, (n, T - 1), generator=g)
        start = torch.zeros(n, 1, dtype=torch.long)
        batch = {**lm, "decoder_input_ids": torch.cat([start, target[:, :-1]], 1), "labels": target}
        loss = _seq2seq_loss
    elif family == "gemma":
        cfg = tf.GemmaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=16,
            tie_word_embeddings=True,
        )  # fmt: skip
        model, targets, batch, loss = tf.GemmaForCausalLM(cfg), ["q_proj", "v_proj"], lm, _lm_loss
    elif family == "opt":
        cfg = tf.OPTConfig(
            vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, layerdrop=0.0,
        )  # fmt: skip
        model, targets, batch, loss = tf.OPTForCausalLM(cfg), ["q_proj", "v_proj"], lm, _lm_loss
    elif family == "mixtral":
        cfg = tf.MixtralConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, num_local_experts=4,
            num_experts_per_tok=2,
            experts_implementation="eager",
        )  # fmt: skip
        model, targets, batch, loss = tf.MixtralForCausalLM(cfg), ["q_proj", "v_proj"], lm, _lm_loss
    elif family == "swin":
        cfg = tf.SwinConfig(
            image_size=16, patch_size=2, num_channels=3, embed_dim=8, depths=[2, 1], num_heads=[2, 2],
            window_size=2, mlp_ratio=2.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            drop_path_rate=0.0, num_labels=CLASSES,
        )  # fmt: skip
        model, targets = tf.SwinForImageClassification(cfg), ["q_proj", "v_proj"]
        batch = {"pixel_values": torch.randn(n, 3, 16, 16, generator=g), "labels": labels}
        loss = _cls_loss
    elif family == "whisper":
        # input_features: (B, num_mel_bins, 2 * max_source_positions), as Whisper's feature extractor pads
        cfg = tf.WhisperConfig(
            vocab_size=VOCAB, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
            max_source_positions=6, max_target_positions=16, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0, decoder_start_token_id=0,
            pad_token_id=0, bos_token_id=0, eos_token_id=0, begin_suppress_tokens=None,
        )  # fmt: skip
        model, targets = tf.WhisperForConditionalGeneration(cfg), ["q_proj", "v_proj"]
        target = torch.randint(1, VOCAB, (n, T - 1), generator=g)
        start = torch.zeros(n, 1, dtype=torch.long)
        batch = {
            "input_features": torch.randn(n, 8, 12, generator=g),
            "decoder_input_ids": torch.cat([start, target[:, :-1]], 1),
            "decoder_attention_mask": mask[:, 1:],
            "labels": target,
        }
        loss = _whisper_loss
    elif family == "wav2vec2":
        # Wav2Vec2ForCTC, base layout: GroupNorm on the first conv of the feature encoder, a grouped
        # positional conv under weight norm; no SpecAugment masking, no layer drop, no dropout.
        cfg = tf.Wav2Vec2Config(
            vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            conv_dim=(8, 8), conv_stride=(3, 2), conv_kernel=(5, 3), feat_extract_norm="group",
            num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, hidden_dropout=0.0,
            activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0,
            layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0, pad_token_id=0,
        )  # fmt: skip
        model, targets = tf.Wav2Vec2ForCTC(cfg), ["q_proj", "v_proj"]
        samples = torch.ones(n, 40, dtype=torch.long)
        samples[0, -8:] = 0  # one padded waveform: 5 frames, 4 for the padded one
        batch = {
            "input_values": torch.randn(n, 40, generator=g) * samples,
            "attention_mask": samples,
            "labels": torch.randint(1, 8, (n, 3), generator=g),
        }
        loss = _ctc_loss
    elif family == "wavlm":
        # WavLMForCTC: Wav2Vec2's feature encoder and positional conv, and an attention that passes the
        # q/k/v/out projections' weights to F.multi_head_attention_forward (the Linears are never called),
        # with a gated relative position bias from a bucket embedding of the first layer (a (T, T) table
        # shared by the batch, handed to the later layers as (B * heads, T, T)).
        cfg = tf.WavLMConfig(
            vocab_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            conv_dim=(8, 8), conv_stride=(3, 2), conv_kernel=(5, 3), feat_extract_norm="group",
            num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, num_buckets=8, max_bucket_distance=16,
            hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
            final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0, pad_token_id=0,
        )  # fmt: skip
        model, targets = tf.WavLMForCTC(cfg), ["intermediate_dense", "output_dense"]
        samples = torch.ones(n, 40, dtype=torch.long)
        samples[0, -8:] = 0  # one padded waveform: 5 frames, 4 for the padded one
        batch = {
            "input_values": torch.randn(n, 40, generator=g) * samples,
            "attention_mask": samples,
            "labels": torch.randint(1, 8, (n, 3), generator=g),
        }
        loss = _ctc_loss
    elif family == "deberta_v2":
        # disentangled relative attention with its own position projections (share_att_key=False): the
        # relative embeddings (a table shared by the batch) go through LayerNorm and pos_key_proj /
        # pos_query_proj; DeBERTa-v3's shared keys are refused (test_models_engine.py)
        model = deberta_v2(share_att_key=False)
        targets, batch, loss = ["query_proj", "value_proj"], {**lm, "labels": labels}, _cls_loss
    else:
        raise KeyError(family)
    model, batch = _float64_batch_and_adapter(model.double(), batch, targets if lora else None)
    return model, batch, loss


def deberta_v2(share_att_key: bool) -> nn.Module:
    """A tiny ``DebertaV2ForSequenceClassification`` with relative attention as DeBERTa-v3 lays it out (c2p
    and p2c, bucketed positions, LayerNorm on the relative embeddings, no absolute positions).
    ``share_att_key=True``, the setting of the published DeBERTa-v2/v3 checkpoints, runs each attention's
    own query/key projections on the relative embeddings; ``False`` gives them projections of their own."""
    import transformers as tf

    cfg = tf.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=CLASSES, relative_attention=True, pos_att_type=["p2c", "c2p"],
        position_buckets=4, max_relative_positions=8, share_att_key=share_att_key, norm_rel_ebd="layer_norm",
        position_biased_input=False, type_vocab_size=0, pooler_dropout=0.0, pooler_hidden_size=16,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.3,  # at 0.02 the relative terms barely move the scores: a fault would hide
    )  # fmt: skip
    return tf.DebertaV2ForSequenceClassification(cfg)
