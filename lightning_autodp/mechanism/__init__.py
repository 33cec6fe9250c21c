"""The DP mechanism, free of any training framework.

Clipping (:mod:`.clipping`), Gaussian noise (:mod:`.noise`), domain-separated randomness
(:mod:`.randomness`), Poisson sampling (:mod:`.sampling`), accounting (:mod:`.accounting`), the
privacy ledger and the dense DP step (:mod:`.step`), and the sharded DP step (:mod:`.sharded`).
Nothing here imports Lightning: the strategies in :mod:`lightning_autodp.integration` drive it.
"""
