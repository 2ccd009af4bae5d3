"""MetaAdamW: AdamW with per-group learning-rate and weight-decay multipliers produced by a small
self-attentive modulator that is meta-trained during training (Zhao & Liu, 2026).

    from metaadamw import MetaAdamW
    opt = MetaAdamW(model.named_parameters())          # a drop-in torch.optim optimizer
    ...
    opt.meta_step(model, loss_fn, batch1, batch2, val_batch)   # every K steps

Components are pluggable and registered by name: FEATURES, GROUPINGS, OBJECTIVES, WEIGHTINGS.
"""

from metaadamw.registry import Registry, UnknownComponentError


def _callable(obj: object) -> str | None:
    """Why an entry point's object cannot be a component (None: it can)."""
    return None if callable(obj) else f"it is of type {type(obj).__name__}, not a class, function or callable object"


FEATURES = Registry("feature extractor", "metaadamw.features", export_name="FEATURES", validate=_callable)
GROUPINGS = Registry("grouping strategy", "metaadamw.groupings", export_name="GROUPINGS", validate=_callable)
OBJECTIVES = Registry("meta objective", "metaadamw.objectives", export_name="OBJECTIVES", validate=_callable)
WEIGHTINGS = Registry("loss weighting", "metaadamw.weightings", export_name="WEIGHTINGS", validate=_callable)

# built-in components register themselves on import
from metaadamw import features, grouping, objectives, weighting  # noqa: E402
from metaadamw.features import FeatureExtractor, GroupLayout  # noqa: E402
from metaadamw.meta import MetaRecord  # noqa: E402
from metaadamw.modulator import Modulator, Multipliers  # noqa: E402
from metaadamw.objectives import MetaObjective, MetaQuantities  # noqa: E402
from metaadamw.optimizer import MetaAdamW  # noqa: E402
from metaadamw.weighting import Weighting  # noqa: E402


def list_features(pattern: str | None = None) -> list[str]:
    return FEATURES.list(pattern)


def list_groupings(pattern: str | None = None) -> list[str]:
    return GROUPINGS.list(pattern)


def list_objectives(pattern: str | None = None) -> list[str]:
    return OBJECTIVES.list(pattern)


def list_weightings(pattern: str | None = None) -> list[str]:
    return WEIGHTINGS.list(pattern)


__all__ = [
    "FEATURES", "GROUPINGS", "OBJECTIVES", "WEIGHTINGS", "FeatureExtractor", "GroupLayout", "MetaAdamW",
    "MetaObjective", "MetaQuantities", "MetaRecord", "Modulator", "Multipliers", "Registry",
    "UnknownComponentError", "Weighting", "list_features", "list_groupings", "list_objectives", "list_weightings",
]
__version__ = "0.1.0"
