"""MetaAdamW: AdamW with per-group learning-rate and weight-decay multipliers produced by a small
self-attentive modulator that is meta-trained during training (Zhao & Liu, 2026)."""

from metaadamw.registry import Registry, UnknownComponentError

FEATURES = Registry("feature extractor", "metaadamw.features", export_name="FEATURES")
GROUPINGS = Registry("grouping strategy", "metaadamw.groupings", export_name="GROUPINGS")
OBJECTIVES = Registry("meta objective", "metaadamw.objectives", export_name="OBJECTIVES")
WEIGHTINGS = Registry("loss weighting", "metaadamw.weightings", export_name="WEIGHTINGS")
