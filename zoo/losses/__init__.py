"""Loss modules: tensor in, tensor out; each docstring gives the formula and the paper."""

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
from zoo.losses.kd import DKDLoss, KDLoss
from zoo.losses.meal import LogitDiscriminator, MEALV2DiscriminatorLoss, SoftCrossEntropy
from zoo.losses.nd import NDLoss, NDProjector
from zoo.losses.segmentation import (
    BoxMaskGenerator,
    CWDLoss,
    LabelNoiser,
    MGDContentLoss,
    MGDSemanticLoss,
    OhemCrossEntropy,
    PixelKDLoss,
    cutmix,
)
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
    "DMAEFeatLoss",
    "G2SDDecoderLoss",
    "HybridFeatureLoss",
    "HybridRelationLoss",
    "ProgressiveMaskSchedule",
    "attention_logits",
    "keep_with_cls",
    "ln0",
    "masked_relations",
    "redundant_token_keep",
    "BoxMaskGenerator",
    "CWDLoss",
    "LabelNoiser",
    "MGDContentLoss",
    "MGDSemanticLoss",
    "OhemCrossEntropy",
    "PixelKDLoss",
    "cutmix",
    "BinaryKLLoss",
    "BinaryKLNormLoss",
    "DKDLoss",
    "KDLoss",
    "LogitDiscriminator",
    "MEALV2DiscriminatorLoss",
    "NDLoss",
    "NDProjector",
    "SoftCrossEntropy",
    "TRGGlobalLoss",
    "TRGInnerLoss",
    "TRGLocalLoss",
    "TokenSampler",
    "feature_tokens",
    "gather_tokens",
    "knn_graph",
    "sample_token_positions",
]
