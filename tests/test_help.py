"""What ``help(DPAutoStrategy)`` shows a new user first."""

from __future__ import annotations

import math
import pydoc

from lightning_autodp import DPAutoStrategy

ARGUMENTS = ("noise_multiplier", "max_grad_norm", "clipping", "gamma", "poisson_sampling", "engine")
ATTRIBUTES = ("noise_multiplier", "steps", "dataset_size", "sample_rate", "expected_batch_size", "ledger")


def first_screen(text: str, columns: int = 100, rows: int = 40) -> str:
    """The lines a pager shows first; a long line (the signature) wraps over several rows."""
    shown, used = [], 0
    for line in text.splitlines():
        used += max(1, math.ceil(len(line) / columns))
        if used > rows:
            break
        shown.append(line)
    return "\n".join(shown)


def test_help_shows_the_dp_arguments_and_attributes_on_its_first_screen():
    text = pydoc.render_doc(DPAutoStrategy, renderer=pydoc.plaintext)
    screen = first_screen(text)
    # ``name`` is the docstring's markup: the signature line alone does not count
    missing = [name for name in (*ARGUMENTS, *ATTRIBUTES) if f"``{name}``" not in screen]
    assert not missing, f"not on help(DPAutoStrategy)'s first screen: {missing}\n{screen}"
    # The inherited DDPStrategy methods are real methods of the class: listed, after its own docs.
    assert text.index("Attributes:") < text.index("Methods inherited from lightning.pytorch.strategies.ddp")


def test_the_attributes_help_names_exist():
    strategy = DPAutoStrategy()
    for name in ATTRIBUTES:
        assert name in vars(strategy) or hasattr(DPAutoStrategy, name), name
