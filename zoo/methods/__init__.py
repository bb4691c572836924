"""LightningModules, one file per method family, over one shared base (``zoo.methods.base``)."""

from zoo.methods.base import DistillationMethod, Outputs
from zoo.methods.classification import DKD, KD, ClassificationMethod, Supervised
from zoo.methods.dhkd import DHKD
from zoo.methods.lad import LAD, LADTeacher
from zoo.methods.llava_kd import LLaVAKD
from zoo.methods.llava_mod import LLaVAMoD
from zoo.methods.matvlm import MaTVLM
from zoo.methods.meal import MEALV2
from zoo.methods.mgd import MGD
from zoo.methods.mim import FineTune, LinearProbe, MAEPretrain
from zoo.methods.mim_distill import DMAE, G2SDGeneric, G2SDSpecific, HybridDistill
from zoo.methods.nd import DKDND, KDND
from zoo.methods.segmentation import CWD, PixelKD, SegmentationMethod, SupervisedSegmentation
from zoo.methods.trg import TRG
from zoo.methods.vl2v_adip import CLIPContrastive, VL2VADiP
from zoo.methods.vlm import VLMMethod, VLMSupervised

__all__ = [
    "CLIPContrastive",
    "CWD",
    "DHKD",
    "DKD",
    "DKDND",
    "DMAE",
    "ClassificationMethod",
    "DistillationMethod",
    "FineTune",
    "G2SDGeneric",
    "G2SDSpecific",
    "HybridDistill",
    "KD",
    "KDND",
    "LAD",
    "LADTeacher",
    "LLaVAKD",
    "LLaVAMoD",
    "LinearProbe",
    "MAEPretrain",
    "MEALV2",
    "MGD",
    "MaTVLM",
    "Outputs",
    "PixelKD",
    "SegmentationMethod",
    "Supervised",
    "SupervisedSegmentation",
    "TRG",
    "VL2VADiP",
    "VLMMethod",
    "VLMSupervised",
]
