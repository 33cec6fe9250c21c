"""Step time and peak memory of DP training against non-private training, one process per configuration.

Trains the same model, on the same synthetic batches, in these modes:

=================  ==========================================================================
``nonprivate``     Lightning Trainer, default strategy (the reference for dp_auto)
``dp_auto_bk``     Lightning Trainer, ``DPAutoStrategy(engine="bk")``  (what users run)
``dp_auto_ghost``  Lightning Trainer, ``DPAutoStrategy(engine="ghost")`` (two backward passes)
``dp_auto_hooks``  Lightning Trainer, ``DPAutoStrategy(engine="hooks")``
``loop``           plain PyTorch loop, non-private (the reference for the loop modes)
``bk_loop``        plain loop driving ``BookKeepingEngine`` + clipping + noise as the strategy does
``opacus_hooks``   plain loop, ``PrivacyEngine.make_private(grad_sample_mode="hooks")``
``opacus_ghost``   plain loop, ``PrivacyEngine.make_private(grad_sample_mode="ghost")``
=================  ==========================================================================

A step is forward + backward + clipping + noise + optimizer step (SGD). Each configuration runs
in a fresh subprocess with ``torch.set_num_threads(2)``, one at a time; the median step time is
taken over the steps after warm-up. Two peaks of memory:

* peak RSS: ``ru_maxrss`` after the timed steps minus the resident set size just before the model
  is built (after imports and data), i.e. the high-water mark of everything training allocates
  (parameters, optimizer state, activations, per-sample state) as the C allocator holds it;
* peak tensor memory: the largest total of live tensors during one more (profiled, untimed) step,
  from torch.profiler's memory timeline, the CPU counterpart of ``torch.cuda.max_memory_allocated``.

Usage::

    python benchmarks/run.py --quick          # a couple of minutes: fewer steps, no large model
    python benchmarks/run.py                  # full run, writes benchmarks/results/results.{md,json}
    python benchmarks/run.py --profile        # torch.profiler table of engine='bk' on the transformer
    python benchmarks/run.py --models hf_gpt2,hf_llama,hf_bert,hf_vit \
        --modes nonprivate,dp_auto_auto,dp_auto_ghost --repeats 3 \
        --out benchmarks/results/results_hf_full_repeats

``--repeats N`` runs every configuration N times, in rounds, and reports medians over the rounds with
the range of each time ratio: on a shared machine one run's ratio can be off by a third.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

MODELS: dict[str, dict[str, Any]] = {
    "mlp": dict(kind="mlp", batch=256, sizes=(784, 512, 512, 10)),
    "transformer": dict(kind="transformer", batch=32, seq=64, d=256, heads=4, ff=1024, layers=2, vocab=1000),
    "transformer_large": dict(
        kind="transformer", batch=16, seq=128, d=384, heads=6, ff=1536, layers=3, vocab=1000
    ),
    # The demo Transformer's sizes as an encoder that Opacus 1.6 can run (see _build).
    "encoder": dict(kind="encoder", batch=32, seq=64, d=256, heads=4, ff=1024, layers=4, vocab=1000),
}
# transformers models from configs (random weights, dropout 0): full fine-tuning and a peft LoRA adapter
_HF = dict(kind="hf", batch=16, seq=128, d=256, heads=4, ff=1024, layers=4, vocab=1000, image=64, patch=8)
for _family in ("gpt2", "bert", "llama", "vit"):
    MODELS[f"hf_{_family}"] = dict(_HF, family=_family, lora=False)
    MODELS[f"hf_{_family}_lora"] = dict(_HF, family=_family, lora=True)
# GPT-2 small's sizes (12 layers, d=768, 12 heads, 50257 tokens) at T=512 and T=1024, for one GPU
# (benchmarks/gpu.sh): the encoder (which Opacus's ghost clipping runs) and transformers' GPT-2
_GPT2_SMALL = dict(d=768, heads=12, ff=3072, layers=12, vocab=50257)
for _seq, _batch in ((512, 8), (1024, 4)):
    MODELS[f"encoder_gpt2s_{_seq}"] = dict(_GPT2_SMALL, kind="encoder", batch=_batch, seq=_seq)
    MODELS[f"hf_gpt2s_{_seq}"] = dict(
        _GPT2_SMALL, kind="hf", family="gpt2", lora=False, batch=_batch, seq=_seq
    )
# Models whose layers need the newer mechanisms of the one-backward engines (phases.py --models ...):
# T5 (a batch-free relative bias table, lifted to its attention) and Gemma (the scaled embedding tied
# to lm_head: one parameter reached by two rules).
for _family in ("t5", "gemma"):
    MODELS[f"hf_{_family}"] = dict(_HF, family=_family, lora=False)
#: ``--tiny``: the same models at sizes that only check the script runs (CPU smoke test)
TINY = dict(batch=4, seq=16, d=32, heads=2, ff=64, layers=2, vocab=100, image=16, patch=8, sizes=(32, 16, 10))
LORA_TARGETS = {
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "vit": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "gemma": ["q_proj", "v_proj"],
}
MODES = [
    "nonprivate", "dp_auto_auto", "dp_auto_bk", "dp_auto_ghost", "dp_auto_hooks",
    "loop", "bk_loop", "opacus_hooks", "opacus_ghost",
]  # fmt: skip
NOISE, MAX_GRAD_NORM, LR = 1.0, 1.0, 1e-3
DEVICE = "cpu"  # --device cuda: the worker trains on the GPU and reads torch.cuda's peak memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------ one worker


def _build(cfg: dict[str, Any], n: int):
    """Model factory, dataset tensors and the per-example loss (mean over the batch)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    g = torch.Generator().manual_seed(0)
    if cfg["kind"] == "mlp":
        sizes = cfg["sizes"]
        x = torch.randn(n, sizes[0], generator=g)
        y = torch.randint(0, sizes[-1], (n,), generator=g)

        def make() -> nn.Module:
            torch.manual_seed(0)
            layers: list[nn.Module] = []
            for a, b in zip(sizes[:-1], sizes[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            return nn.Sequential(*layers[:-1])

        def forward(net: nn.Module, xb, yb):
            return net(xb), yb

        return make, (x, y), forward, nn.CrossEntropyLoss(), None
    if cfg["kind"] == "hf":
        return _hf(cfg, n, g)
    from lightning.pytorch.demos import Transformer

    x = torch.randint(0, cfg["vocab"], (n, cfg["seq"]), generator=g)
    y = torch.randint(0, cfg["vocab"], (n, cfg["seq"]), generator=g)
    shape = (cfg["batch"], cfg["seq"], cfg["vocab"])
    if cfg["kind"] == "encoder":
        return _encoder(cfg), (x, y), _encoder_forward, nn.NLLLoss(), shape

    def make() -> nn.Module:
        torch.manual_seed(0)
        return Transformer(
            vocab_size=cfg["vocab"],
            ninp=cfg["d"],
            nhead=cfg["heads"],
            nhid=cfg["ff"],
            nlayers=cfg["layers"],
            dropout=0.0,
        )

    def forward(net: nn.Module, xb, yb):
        # log-probabilities (B*T, V); loss: mean over tokens and examples (nll)
        return net(xb, yb), yb.reshape(-1)

    del F
    return make, (x, y), forward, nn.NLLLoss(), shape


class Encoder(nn.Module):
    """A token tagger of the demo Transformer's width: embeddings, ``layers`` encoder layers
    (the demo has ``layers`` encoder and ``layers`` decoder layers), a vocabulary head.

    Opacus 1.6 cannot run the demo Transformer (causal masks in DPMultiheadAttention, the
    embedding used twice under ghost clipping), so this model, with no mask, no tied weights and
    positions as a batch-first ``(B, T)`` embedding input, is where dp_auto meets Opacus on a
    transformer. (At module level: Opacus deep-copies the model.)
    """

    def __init__(self, vocab: int, seq: int, d: int, heads: int, ff: int, layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.position = nn.Embedding(seq, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.decoder = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
        h = self.encoder(self.embedding(ids) + self.position(positions))
        return torch.log_softmax(self.decoder(h), dim=-1).flatten(0, 1)


def _hf(cfg: dict[str, Any], n: int, g: torch.Generator):
    """A transformers model from a config (GPT-2 / Llama: causal LM; BERT / ViT: classification)."""
    import transformers as tf

    family, d, classes = cfg["family"], cfg["d"], 10
    common = dict(num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], hidden_size=d,
                  intermediate_size=cfg["ff"])  # fmt: skip
    dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "gpt2":
        config = tf.GPT2Config(
            vocab_size=cfg["vocab"], n_positions=cfg["seq"], n_embd=d, n_layer=cfg["layers"],
            n_head=cfg["heads"], n_inner=cfg["ff"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        build = lambda: tf.GPT2LMHeadModel(config)  # noqa: E731
    elif family == "llama":
        config = tf.LlamaConfig(vocab_size=cfg["vocab"], max_position_embeddings=cfg["seq"], **common)
        build = lambda: tf.LlamaForCausalLM(config)  # noqa: E731
    elif family == "bert":
        config = tf.BertConfig(
            vocab_size=cfg["vocab"],
            max_position_embeddings=cfg["seq"],
            num_labels=classes,
            **common,
            **dropout,
        )
        build = lambda: tf.BertForSequenceClassification(config)  # noqa: E731
    elif family == "t5":
        config = tf.T5Config(
            vocab_size=cfg["vocab"], d_model=d, d_kv=d // cfg["heads"], d_ff=cfg["ff"],
            num_layers=cfg["layers"], num_heads=cfg["heads"], dropout_rate=0.0, decoder_start_token_id=0,
            pad_token_id=0, use_cache=False,
        )  # fmt: skip
        build = lambda: tf.T5ForConditionalGeneration(config)  # noqa: E731
    elif family == "gemma":
        config = tf.GemmaConfig(
            vocab_size=cfg["vocab"], max_position_embeddings=cfg["seq"], num_key_value_heads=cfg["heads"],
            head_dim=d // cfg["heads"], tie_word_embeddings=True, use_cache=False, **common,
        )  # fmt: skip
        build = lambda: tf.GemmaForCausalLM(config)  # noqa: E731
    else:
        config = tf.ViTConfig(
            image_size=cfg["image"], patch_size=cfg["patch"], num_labels=classes, **common, **dropout
        )
        build = lambda: tf.ViTForImageClassification(config)  # noqa: E731

    def make() -> nn.Module:
        torch.manual_seed(0)
        net = build()
        if cfg["lora"]:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS[family],
                              fan_in_fan_out=family == "gpt2")  # fmt: skip
            net = get_peft_model(net, lora)
        return net

    if family == "vit":
        x = torch.randn(n, 3, cfg["image"], cfg["image"], generator=g)
    else:
        x = torch.randint(0, cfg["vocab"], (n, cfg["seq"]), generator=g)
    if family == "t5":
        y = torch.randint(0, cfg["vocab"], (n, cfg["seq"]), generator=g)

        def seq2seq(net: nn.Module, xb, yb):
            start = torch.zeros_like(yb[:, :1])
            decoder_ids = torch.cat([start, yb[:, :-1]], 1)
            return net(input_ids=xb, decoder_input_ids=decoder_ids).logits.flatten(0, 1), yb.reshape(-1)

        return make, (x, y), seq2seq, nn.CrossEntropyLoss(), (cfg["batch"], cfg["seq"], cfg["vocab"])
    if family in ("gpt2", "llama", "gemma"):
        y = torch.randint(0, cfg["vocab"], (n, cfg["seq"]), generator=g)

        def forward(net: nn.Module, xb, yb):
            return net(input_ids=xb).logits.flatten(0, 1), yb.reshape(-1)

        return make, (x, y), forward, nn.CrossEntropyLoss(), (cfg["batch"], cfg["seq"], cfg["vocab"])
    y = torch.randint(0, classes, (n,), generator=g)
    key = "pixel_values" if family == "vit" else "input_ids"

    def classify(net: nn.Module, xb, yb):
        return net(**{key: xb}).logits, yb

    return make, (x, y), classify, nn.CrossEntropyLoss(), None


def _encoder(cfg: dict[str, Any]):
    def make() -> nn.Module:
        torch.manual_seed(0)
        return Encoder(cfg["vocab"], cfg["seq"], cfg["d"], cfg["heads"], cfg["ff"], cfg["layers"])

    return make


def _encoder_forward(net, xb, yb):
    return net(xb), yb.reshape(-1)


def _tensor_peak_mb(prof) -> float:
    """Peak bytes of live tensors in a profiled step (torch.profiler's memory timeline): the CPU
    counterpart of ``torch.cuda.max_memory_allocated``, free of the C allocator's behaviour."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return max(sum(s) for s in sizes) / 2**20


def _memory_profiler():
    import torch

    return torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        profile_memory=True,
        record_shapes=True,
        with_stack=True,
    )


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


class _PeakTensors:
    """Peak tensor memory of the steps inside: torch.cuda's allocator peak on a GPU, the profiler's
    memory timeline on the CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.peak_mb = cuda, 0.0

    def __enter__(self) -> _PeakTensors:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.prof = _memory_profiler()
            self.prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.prof.__exit__(*exc)
            self.peak_mb = _tensor_peak_mb(self.prof)


def worker(model_name: str, mode: str, steps: int, warmup: int, profile: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(2)
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_autodp  # noqa: F401
    from lightning_autodp import DPAutoStrategy

    cfg = MODELS[model_name]
    cuda = DEVICE == "cuda"
    total = steps + warmup + 1  # the last step is profiled for tensor memory, not timed
    make, (x, y), forward, criterion, shape = _build(cfg, cfg["batch"] * total)
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg["batch"], shuffle=False)
    times: list[float] = []
    peaks: dict[str, float] = {}
    baseline = _rss_mb()
    net = make()

    if mode == "nonprivate" or mode.startswith("dp_auto_"):

        class Task(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def training_step(self, batch, batch_idx):
                out, target = forward(self.net, *batch)
                return criterion(out, target)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=LR)

        class Timer(L.Callback):
            def on_train_batch_start(self, *args: Any) -> None:
                if len(times) == total - 1:
                    peaks["rss"] = _maxrss_mb()
                    self.prof = _PeakTensors(cuda)
                    self.prof.__enter__()
                _sync(cuda)
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, *args: Any) -> None:
                _sync(cuda)
                times.append(time.perf_counter() - self.t0)
                if len(times) == total:
                    self.prof.__exit__(None, None, None)
                    peaks["tensor"] = self.prof.peak_mb

        strategy: Any = "auto"
        if mode != "nonprivate":
            strategy = DPAutoStrategy(
                noise_multiplier=NOISE,
                max_grad_norm=MAX_GRAD_NORM,
                engine=mode.removeprefix("dp_auto_"),
                poisson_sampling=False,  # fixed batch shapes, as in the Opacus runs
            )
        trainer = L.Trainer(
            strategy=strategy,
            accelerator="gpu" if cuda else "cpu",
            devices=1,
            max_steps=total,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Timer()],
        )
        trainer.fit(Task(), loader)
    else:
        net = net.to(DEVICE)
        optimizer = torch.optim.SGD(net.parameters(), lr=LR)
        step = _loop_step(mode, net, optimizer, loader, forward, criterion, shape)
        prof = None
        batches = [[t.to(DEVICE) for t in batch] for batch in loader]
        for i, batch in enumerate(batches[:-1]):
            if profile and i == warmup:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                prof.__enter__()
            _sync(cuda)
            t0 = time.perf_counter()
            step(batch)
            _sync(cuda)
            times.append(time.perf_counter() - t0)
        peaks["rss"] = _maxrss_mb()
        with _PeakTensors(cuda) as mem_prof:
            step(batches[-1])
        peaks["tensor"] = mem_prof.peak_mb
        if prof is not None:
            prof.__exit__(None, None, None)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            (HERE / "results" / f"profile_{mode}_{model_name}.txt").write_text(table)
    timed = times[warmup : warmup + steps]
    return dict(
        model=model_name,
        mode=mode,
        steps=len(timed),
        median_step_s=statistics.median(timed),
        peak_mb=peaks["rss"] - baseline,
        tensor_peak_mb=peaks["tensor"],
        baseline_rss_mb=baseline,
    )


def plain_gradient(net, batch, forward, criterion) -> None:
    """``p.grad`` of one non-private step: the mean loss's gradient; no optimizer step."""
    net.zero_grad(set_to_none=True)
    out, target = forward(net, *batch)
    criterion(out, target).backward()


#: The phases of :func:`bk_gradient`, in order.
PHASES = ("forward_backward", "norms", "clipped_sum", "noise")


def bk_gradient(engine, noise, net, batch, forward, criterion, phases: dict | None = None) -> None:
    """``p.grad`` of one DP step as ``DPAutoStrategy`` computes it (``DPStep``'s arithmetic, engine
    ``bk``): forward and backward under capture, per-example norms, the clipped weighted sum (AUTO-S),
    Gaussian noise; no optimizer step. With ``phases`` (a dict of lists) each phase's wall time, in
    :data:`PHASES` order, is appended to its list."""
    from lightning_autodp.mechanism.clipping import clip_factors

    cuda = DEVICE == "cuda"
    marks = [time.perf_counter()]

    def mark() -> None:
        _sync(cuda)
        marks.append(time.perf_counter())

    engine.expect_batch_size(batch[0].shape[0])
    with engine.capturing():
        out, target = forward(net, *batch)
        criterion(out, target).backward()
    mark()
    b = engine.batch_size
    scale = 1.0 / b
    with torch.no_grad():
        norms = engine.per_sample_squared_norms().sqrt() / scale
        mark()
        summed: dict = {}
        engine.accumulate_weighted_sum(clip_factors(norms, "auto_s", MAX_GRAD_NORM, 0.01) / scale, summed)
        engine.reset()
        mark()
        for p in engine.params:
            s = summed.pop(p, None)
            s = torch.zeros_like(p) if s is None else s
            s.add_(noise.gaussian(NOISE * MAX_GRAD_NORM, like=s))
            p.grad = s / b
        mark()
    if phases is not None:
        for name, start, end in zip(PHASES, marks, marks[1:]):
            phases.setdefault(name, []).append(end - start)


def _loop_step(mode, net, optimizer, loader, forward, criterion, shape):
    import torch

    if mode == "loop":

        def step(batch):
            plain_gradient(net, batch, forward, criterion)
            optimizer.step()

        return step
    if mode == "bk_loop":
        from lightning_autodp.engines.bookkeeping import BookKeepingEngine
        from lightning_autodp.mechanism.noise import NoiseSource

        engine = BookKeepingEngine(net)
        noise = NoiseSource(seed=0)

        def step(batch):
            bk_gradient(engine, noise, net, batch, forward, criterion)
            optimizer.step()

        return step
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    # Opacus cannot hook nn.MultiheadAttention: its own fix swaps in DPMultiheadAttention, as an
    # Opacus user would have to. On lightning's demo Transformer that still fails (Opacus 1.6:
    # DPMultiheadAttention rejects is_causal, and its batch_first mask check compares against the
    # batch size; ghost clipping rejects the embedding called twice); the table records the error.
    if ModuleValidator.validate(net, strict=False):
        net = ModuleValidator.fix(net).to(DEVICE)  # the swapped-in modules are built on the CPU
        optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    engine = PrivacyEngine()
    grad_sample_mode = mode.removeprefix("opacus_")
    if grad_sample_mode == "hooks":
        model, dp_opt, _ = engine.make_private(
            module=net,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=NOISE,
            max_grad_norm=MAX_GRAD_NORM,
            poisson_sampling=False,
            grad_sample_mode="hooks",
        )

        def step(batch):
            dp_opt.zero_grad(set_to_none=True)
            out, target = forward(model, *batch)
            criterion(out, target).backward()
            dp_opt.step()

        return step
    model, dp_opt, dp_criterion, _ = engine.make_private(
        module=net,
        optimizer=optimizer,
        data_loader=loader,
        criterion=criterion,
        noise_multiplier=NOISE,
        max_grad_norm=MAX_GRAD_NORM,
        poisson_sampling=False,
        grad_sample_mode="ghost",
    )

    def step(batch):
        dp_opt.zero_grad(set_to_none=True)
        out, target = forward(model, *batch)
        loss = dp_criterion(out, target, shape=shape) if shape else dp_criterion(out, target)
        loss.backward()
        dp_opt.step()

    return step


# ------------------------------------------------------------------------------ driver


def _run_one(
    model: str, mode: str, steps: int, warmup: int, profile: bool = False, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", model, mode, "--steps", str(steps), "--warmup", str(warmup)]
    cmd += list(extra)
    if profile:
        cmd.append("--profile")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {model:18s} {mode:14s} FAILED: {err}", flush=True)
        return dict(model=model, mode=mode, error=err)
    result = json.loads(lines[-1])
    print(
        f"  {model:18s} {mode:14s} {result['median_step_s'] * 1e3:9.1f} ms/step  "
        f"peak {result['peak_mb']:8.1f} MB  ({time.time() - t0:.0f} s)",
        flush=True,
    )
    return result


def _ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["model"], r["mode"]): r for r in results if "error" not in r}
    rows = []
    for r in results:
        row = dict(r)
        if "error" not in r:
            ref_mode = (
                "nonprivate" if r["mode"].startswith("dp_auto") or r["mode"] == "nonprivate" else "loop"
            )
            ref = by.get((r["model"], ref_mode))
            if ref:
                row["time_ratio"] = r["median_step_s"] / ref["median_step_s"]
                row["memory_ratio"] = r["peak_mb"] / ref["peak_mb"]
                row["tensor_memory_ratio"] = r["tensor_peak_mb"] / ref["tensor_peak_mb"]
            for other in ("opacus_hooks", "dp_auto_hooks"):
                hooks = by.get((r["model"], other))
                if hooks:
                    row[f"speedup_vs_{other}"] = hooks["median_step_s"] / r["median_step_s"]
        rows.append(row)
    return rows


def _over_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per configuration from ``--repeats`` rounds (each round: every configuration once,
    its ratios taken against its own round's reference): the median of every measure over the
    rounds, and ``time_ratio_range`` (lowest, highest) where a configuration has several ratios.

    Rounds interleave the configurations, so a slow spell of a shared machine slows a reference and
    the runs compared with it alike instead of landing on one configuration.
    """
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for rows in rounds:
        for r in rows:
            by[(r["model"], r["mode"])].append(r)
    out = []
    for (model, mode), rows in by.items():
        ok = [r for r in rows if "error" not in r]
        if not ok:
            out.append(rows[0])
            continue
        row: dict[str, Any] = dict(model=model, mode=mode, steps=ok[0]["steps"], rounds=len(ok))
        for key in {k for r in ok for k, v in r.items() if isinstance(v, float)}:
            values = [r[key] for r in ok if key in r]
            row[key] = statistics.median(values)
        ratios = [r["time_ratio"] for r in ok if "time_ratio" in r]
        if len(ratios) > 1:
            row["time_ratio_range"] = (min(ratios), max(ratios))
        out.append(row)
    return out


def _x(row: dict[str, Any], key: str, digits: int) -> str:
    """A ratio as ``1.23x`` (``1.23x (1.18-1.30)`` with the range over rounds), or ``-`` where its
    reference did not run."""
    if key not in row:
        return "-"
    spread = row.get(f"{key}_range")
    within = f" ({spread[0]:.{digits}f}-{spread[1]:.{digits}f})" if spread else ""
    return f"{row[key]:.{digits}f}x{within}"


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [
        "| model | mode | median step (ms) | time / non-private | peak RSS MB | RSS / non-private "
        "| peak tensor MB | tensors / non-private | speed-up vs Opacus hooks | speed-up vs dp_auto hooks |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['mode']} | failed: {r['error'][:90]} | | | | | | | |")
            continue
        out.append(
            f"| {r['model']} | {r['mode']} | {r['median_step_s'] * 1e3:.1f} "
            f"| {_x(r, 'time_ratio', 2)} | {r['peak_mb']:.0f} | {_x(r, 'memory_ratio', 2)} "
            f"| {r['tensor_peak_mb']:.0f} | {_x(r, 'tensor_memory_ratio', 2)} "
            f"| {_x(r, 'speedup_vs_opacus_hooks', 1)} | {_x(r, 'speedup_vs_dp_auto_hooks', 1)} |"
        )
    out.append("")
    out.append(
        f"{meta['steps']} timed steps after {meta['warmup']} warm-up steps{_rounds_note(meta)}; "
        f"torch {meta['torch']}, "
        f"opacus {meta['opacus']}, lightning {meta['lightning']}, {meta['cpu']}, 2 threads. "
        "dp_auto_* rows are relative to `nonprivate` (Lightning Trainer); loop rows (bk_loop, "
        "opacus_*) to `loop` (plain PyTorch). Absolute times on this 2-core machine are noisy; "
        "the ratios come from the same run, one configuration at a time."
    )
    return "\n".join(out)


def _rounds_note(meta: dict[str, Any]) -> str:
    repeats = meta.get("repeats", 1)
    if repeats == 1:
        return ""
    return (
        f", {repeats} rounds of every configuration (medians over the rounds; a time ratio's range in "
        "brackets, each round's ratio against the same round's reference)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps, no large model")
    parser.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--modes", default=None, help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="profile bk_loop on the transformer")
    parser.add_argument(
        "--out", default=str(HERE / "results" / "results"), help="output path without extension"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    parser.add_argument("--tiny", action="store_true", help="tiny model sizes: only checks that it runs")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of every model x mode: the median over rounds and the time ratio's range",
    )
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if args.tiny:
        for cfg in MODELS.values():
            cfg.update({k: v for k, v in TINY.items() if k in cfg})
    extra = ("--device", args.device) + (("--tiny",) if args.tiny else ())
    if args.worker:
        result = worker(*args.worker, args.steps, args.warmup, args.profile)
        print(json.dumps(result), flush=True)
        return
    steps = args.steps or (5 if args.quick else 20)
    warmup = args.warmup or (2 if args.quick else 3)
    if args.profile:
        _run_one("transformer", "bk_loop", steps, warmup, profile=True)
        _run_one("transformer", "loop", steps, warmup, profile=True)
        return
    models = (
        args.models.split(",")
        if args.models
        else (["mlp", "transformer"] if args.quick else [m for m in MODELS if "gpt2s" not in m])
    )  # the GPT-2-small sizes are for a GPU: name them with --models
    modes = args.modes.split(",") if args.modes else MODES
    import lightning
    import opacus
    import torch

    meta = dict(
        steps=steps,
        warmup=warmup,
        torch=torch.__version__,
        opacus=opacus.__version__,
        lightning=lightning.__version__,
        cpu=f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
        python=platform.python_version(),
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        tiny=args.tiny,
        models={m: MODELS[m] for m in models},
        repeats=args.repeats,
    )
    rounds = []
    for i in range(args.repeats):
        if args.repeats > 1:
            print(f"round {i + 1} of {args.repeats}", flush=True)
        results = [_run_one(model, mode, steps, warmup, extra=extra) for model in models for mode in modes]
        rounds.append(_ratios(results))
    rows = rounds[0] if args.repeats == 1 else _over_rounds(rounds)
    Path(args.out + ".json").write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    table = _markdown(rows, meta)
    print(table)
    Path(args.out + ".md").write_text("# Benchmark results (benchmarks/run.py)\n\n" + table + "\n")


if __name__ == "__main__":
    main()
