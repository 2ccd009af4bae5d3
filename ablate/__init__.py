"""ablate: assemble MetaAdamW variants, sweep them across tasks and seeds on Ray Tune, tune the
uncertainty-weighting priorities with Optuna, store every result and report on it."""

__version__ = "0.1.0"
