"""The ``curvlib demo`` job: every optimizer of curvlib against SGD and Adam on 8×8 digits.

* :mod:`curvlib.demo.data` — scikit-learn's digits, split and standardised;
* :mod:`curvlib.demo.models` — the MLP and the small CNN;
* :mod:`curvlib.demo.methods` — the compared optimizers and their default hyper-parameters;
* :mod:`curvlib.demo.train` — the seeded, timed training loop;
* :mod:`curvlib.demo.curvature` — the curvature report of a model on a batch (per-layer η, H̄);
* :mod:`curvlib.demo.report` — the results table, the plots and the markdown report.
"""
