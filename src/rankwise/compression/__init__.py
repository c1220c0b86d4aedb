"""One-shot low-rank compression W ≈ B A (docs/methods.md §2–§3).

* :mod:`rankwise.compression.methods`: the factorisation methods (svd, asvd, fwsvd, whiten), by name;
* :mod:`rankwise.compression.calibration`: forward loops and hooks that collect input statistics,
  including sequential block-by-block calibration;
* :mod:`rankwise.compression.allocation`: how many directions each matrix keeps;
* :mod:`rankwise.compression.api`: ``compress(model, CompressConfig(...), calib=...)``.
"""
