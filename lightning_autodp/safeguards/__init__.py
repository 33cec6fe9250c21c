"""Safeguards that check the mechanism on the code that trains.

Engine verification against a per-example loop (:mod:`.verify`), run-time checks of noise and
sampling (:mod:`.checks`) and one-run privacy auditing with canaries (:mod:`.audit`).
"""
