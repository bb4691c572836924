"""Loss modules: tensor in, tensor out; each docstring gives the formula and the paper.

Every loss computes in at least float32 (:func:`zoo.losses.functional.at_least_float32`): half and bfloat16
inputs are promoted to float32, float64 inputs stay float64.
"""

from zoo.losses.dhkd import BinaryKLLoss, BinaryKLNormLoss
from zoo.losses.feature import (
    DMAEFeatLoss,
    G2SDDecoderLoss,
    HybridFeatureLoss,
    HybridRelationLoss,
    ProgressiveMaskSchedule,
    attention_logits,
    keep_with_cls,
    ln0,
    masked_relations,
    redundant_token_keep,
)
from zoo.losses.functional import at_least_float32
from zoo.losses.kd import DKDLoss, KDLoss
from zoo.losses.meal import LogitDiscriminator, MEALV2DiscriminatorLoss, SoftCrossEntropy
from zoo.losses.nd import NDLoss, NDProjector
from zoo.losses.segmentation import CWDLoss, MGDContentLoss, MGDSemanticLoss, OhemCrossEntropy, PixelKDLoss
from zoo.losses.trg import (
    TokenSampler,
    TRGGlobalLoss,
    TRGInnerLoss,
    TRGLocalLoss,
    feature_tokens,
    gather_tokens,
    knn_graph,
    sample_token_positions,
)

__all__ = [
    "BinaryKLLoss",
    "BinaryKLNormLoss",
    "CWDLoss",
    "DKDLoss",
    "DMAEFeatLoss",
    "G2SDDecoderLoss",
    "HybridFeatureLoss",
    "HybridRelationLoss",
    "KDLoss",
    "LogitDiscriminator",
    "MEALV2DiscriminatorLoss",
    "MGDContentLoss",
    "MGDSemanticLoss",
    "NDLoss",
    "NDProjector",
    "OhemCrossEntropy",
    "PixelKDLoss",
    "ProgressiveMaskSchedule",
    "SoftCrossEntropy",
    "TRGGlobalLoss",
    "TRGInnerLoss",
    "TRGLocalLoss",
    "TokenSampler",
    "at_least_float32",
    "attention_logits",
    "feature_tokens",
    "gather_tokens",
    "keep_with_cls",
    "knn_graph",
    "ln0",
    "masked_relations",
    "redundant_token_keep",
    "sample_token_positions",
]
