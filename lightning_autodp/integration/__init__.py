"""The Lightning integration: strategies, callbacks, the privacy report and the run summary.

``DPAutoStrategy`` ("dp_auto") and ``DPFSDPStrategy`` ("dp_fsdp") map Lightning's hooks onto the
mechanism of :mod:`lightning_autodp.mechanism`; ``PrivacyBudget`` accounts and calibrates;
:mod:`lightning_autodp._compat` holds every access to private Lightning, torch and Opacus internals
(shared by every layer, so that the engines need not import the integration).
"""
