"""lightning-autodp: differentially private training in PyTorch Lightning with automatic clipping.

Importing the package registers ``strategy="dp_auto"`` with Lightning::

    import lightning as L
    import lightning_autodp

    trainer = L.Trainer(strategy="dp_auto", callbacks=[lightning_autodp.PrivacyBudget(target_epsilon=3.0)])
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_autodp.engines.hooks import HooksEngineError
from lightning_autodp.integration.callbacks import PrivacyBudget
from lightning_autodp.integration.dp_mechanism import DPConfig, DPMechanism
from lightning_autodp.integration.fsdp import DPFSDPStrategy
from lightning_autodp.integration.strategy import DPAutoStrategy
from lightning_autodp.mechanism.accounting import Accountant
from lightning_autodp.mechanism.clipping import clip_factors
from lightning_autodp.mechanism.observers import StepContext, StepObserver
from lightning_autodp.mechanism.sampling import DistributedPoissonBatchSampler, EmptyBatch
from lightning_autodp.safeguards.audit import PrivacyAudit
from lightning_autodp.safeguards.batchnorm import BatchNormModeError
from lightning_autodp.safeguards.checks import PrivacyCheckError, RunTimeChecks
from lightning_autodp.safeguards.verify import EngineVerificationError

__version__ = "0.2.0"

for _strategy in (DPAutoStrategy, DPFSDPStrategy):
    if _strategy.strategy_name not in StrategyRegistry:
        _strategy.register_strategies(StrategyRegistry)

__all__ = [
    "Accountant",
    "BatchNormModeError",
    "DPAutoStrategy",
    "DPConfig",
    "DPFSDPStrategy",
    "DPMechanism",
    "DistributedPoissonBatchSampler",
    "EmptyBatch",
    "EngineVerificationError",
    "HooksEngineError",
    "PrivacyAudit",
    "PrivacyBudget",
    "PrivacyCheckError",
    "RunTimeChecks",
    "StepContext",
    "StepObserver",
    "clip_factors",
]
