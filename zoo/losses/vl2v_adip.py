"""VL2V-ADiP: distilling a CLIP teacher's image embedding and class text embedding into a projected student."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from zoo.losses.functional import at_least_float32

__all__ = ["ClassPromptCLIPLoss", "VL2VADiPLoss"]


class VL2VADiPLoss(nn.Module):
    """The VL2V-ADiP distillation loss: cosine alignment to the teacher's image embedding and to the true class's
    text embedding.

        L = −λ · (1/B) Σ_i cos(u_i, e_I,i) − (1 − λ) · (1/B) Σ_i cos(u_i, e_y_i)

    u is the student's projected feature P·g(x) + b (its norm does not matter), e_I the teacher's image embedding of
    the same (augmented) image and e_y the text embedding of the image's class. The same loss trains P in the Align
    stage and the backbone in the Distill stage. Paper: Addepalli et al., "Leveraging Vision-Language Models for
    Improving Domain Generalization in Image Classification", CVPR 2024, arXiv 2310.08255.

    Args:
        lmd: λ, the weight of the image term. Default 0.5: ``hparams["lmd"]`` of the official code
            (``val-iisc/VL2V-ADiP``, ``domainbed/hparams_registry.py`` and ``train_all.py --lmd``).

    With CutMix (the official code's optional branch, off by default: ``beta`` 0, ``cutmix_prob`` 0), the image is
    mixed from images a and b with pixel share ``mix`` for a, the teacher embeds the mixed image, and the loss is
    mix · L(u, e_I, e_ya) + (1 − mix) · L(u, e_I, e_yb): the image term is unchanged and the text term's target is
    mixed. Pass ``text_b`` and ``mix`` to :meth:`forward` / :meth:`parts` for it.

    Notes:
        The official ``dfc_loss`` takes ``F.cosine_similarity`` of the normalised projection with the teacher's
        normalised image embedding and with a row of its zero-shot weights (text embeddings × exp(logit_scale)); a
        cosine ignores those scales, so this loss takes unnormalised inputs.

    Example:
        >>> import torch
        >>> loss = VL2VADiPLoss(lmd=0.5)
        >>> u = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> e_img = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> e_txt = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
        >>> round(float(loss(u, e_img, e_txt)), 4)
        -0.6768
        >>> float(loss(u, u, u))
        -1.0
    """

    def __init__(self, lmd: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= lmd <= 1.0:
            raise ValueError(f"VL2VADiPLoss.lmd must be in [0, 1], got {lmd}")
        self.lmd = lmd

    def parts(
        self, student: Tensor, image: Tensor, text: Tensor, text_b: Tensor | None = None, mix: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """The weighted image and text terms, −λ·mean cos(u, e_I) and −(1 − λ)·mean cos(u, e_y) (mixed with CutMix);
        their sum is :meth:`forward`."""
        if student.shape != image.shape or student.shape != text.shape:
            raise ValueError(
                f"VL2VADiPLoss: student {tuple(student.shape)}, image {tuple(image.shape)} and text "
                f"{tuple(text.shape)} embeddings must have the same (batch, dim) shape"
            )
        u = at_least_float32(student)
        image_term = -F.cosine_similarity(u, at_least_float32(image), dim=-1).mean()
        text_term = -F.cosine_similarity(u, at_least_float32(text), dim=-1).mean()
        if text_b is not None:
            if text_b.shape != text.shape:
                raise ValueError(f"VL2VADiPLoss: text_b {tuple(text_b.shape)} must match text {tuple(text.shape)}")
            if not 0.0 <= mix <= 1.0:
                raise ValueError(f"VL2VADiPLoss: mix must be in [0, 1], got {mix}")
            text_term_b = -F.cosine_similarity(u, at_least_float32(text_b), dim=-1).mean()
            text_term = mix * text_term + (1.0 - mix) * text_term_b
        return self.lmd * image_term, (1.0 - self.lmd) * text_term

    def forward(
        self, student: Tensor, image: Tensor, text: Tensor, text_b: Tensor | None = None, mix: float = 1.0
    ) -> Tensor:
        image_term, text_term = self.parts(student, image, text, text_b, mix)
        return image_term + text_term


class ClassPromptCLIPLoss(nn.Module):
    """CLIP's symmetric contrastive loss for labelled images whose captions are class prompts (trains the digits
    CLIP teacher of the VL2V-ADiP CPU check).

    With unit image embeddings v_i (i = 1..B), unit embeddings t_k of the batch's K distinct class prompts, k(i) the
    prompt of image i and s the logit scale:

        L = ½ · [ (1/B) Σ_i CE(s·v_i·Tᵀ, k(i))  +  (1/K) Σ_k CE(s·t_k·Vᵀ, q_k) ],   q_k uniform over {i : k(i) = k}

    This is CLIP's InfoNCE (Radford et al., arXiv 2103.00020; open_clip's ``ClipLoss``) with every distinct caption
    counted once and all images of a class as its caption's positives: with one caption per class, the plain loss
    would push apart images of the same class. Prompts of classes absent from the batch only act as negatives.

    Example:
        >>> import torch
        >>> v = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.9, -0.1], [0.0, 1.0]]), dim=-1)
        >>> t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> loss = ClassPromptCLIPLoss()
        >>> round(float(loss(v, t, torch.tensor([0, 0, 1]), logit_scale=10.0)), 4)
        0.1734
    """

    def forward(self, image: Tensor, text: Tensor, target: Tensor, logit_scale: float | Tensor) -> Tensor:
        if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1]:
            raise ValueError(
                f"ClassPromptCLIPLoss: expected image (B, D) and text (K, D) embeddings, got {tuple(image.shape)} "
                f"and {tuple(text.shape)}"
            )
        v, t = at_least_float32(image), at_least_float32(text)
        logits = logit_scale * v @ t.t()  # (B, K)
        image_to_text = F.cross_entropy(logits, target)
        positives = F.one_hot(target, t.shape[0]).t().to(logits.dtype)  # (K, B)
        present = positives.sum(1) > 0  # prompts without an image in the batch have no positive
        targets = positives[present] / positives[present].sum(1, keepdim=True)
        text_to_image = F.cross_entropy(logits.t()[present], targets)
        return 0.5 * (image_to_text + text_to_image)
