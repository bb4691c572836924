"""Vision-language data: LLaVA conversation JSON, RLAIF-V preference pairs, and the embedded digits VQA.

Every sample becomes one token sequence in which each image is already expanded to its visual tokens (``K`` copies of
the image token id), so the visual positions of a batch are exactly ``input_ids == image_token_id`` for every model
that reads it, as with the Hugging Face processors. Labels are the input ids on the assistant's answers and ``-100``
elsewhere (unshifted: position i carries token i, the model's logits at i - 1 predict it).

A batch is a dict::

    input_ids (B, L), attention_mask (B, L), labels (B, L)        right-padded
    images: {"pixel_values": ..., ...}                              the models' image inputs (one image per sample)
    answer (B,)                                                     digits only: the digit shown

and a preference batch ``{"chosen": {input_ids, attention_mask, labels}, "rejected": {...}, "images": {...}}``.

Text goes through a tokenizer (the shipped word-level ``digits`` vocabulary, a ``vocab.txt`` folder, or a local
Hugging Face tokenizer) and a chat template (:data:`TEMPLATES`); images through a resize-and-normalise pipeline for
the zoo's LLaVA-style models (:class:`zoo.models.vlm.LlavaModel`), or through a local Hugging Face processor for real
VLMs (LLaVA-1.5, Qwen2-VL), whose image placeholder expansion the processor decides.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from zoo.data.base import ZooDataModule

__all__ = [
    "DIGITS_VOCAB",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN_INDEX",
    "TEMPLATES",
    "ChatTemplate",
    "ConversationFormatter",
    "DigitsVQADataModule",
    "LlavaJsonDataModule",
    "VLMDataModule",
    "WordTokenizer",
    "load_tokenizer",
    "pad_sequences",
]

#: Label value that losses ignore (PyTorch's and LLaVA's).
IGNORE_INDEX = -100
#: Token id that marks visual positions for the zoo's own LLaVA-style models (LLaVA's ``IMAGE_TOKEN_INDEX``); it is
#: never looked up in an embedding table, the projected image features replace it.
IMAGE_TOKEN_INDEX = -200
#: Where an image goes in a conversation's text (LLaVA's ``DEFAULT_IMAGE_TOKEN``).
IMAGE_PLACEHOLDER = "<image>"

#: The shipped 32-word vocabulary of the digits tasks (VQA, captions, preference pairs).
DIGITS_VOCAB: tuple[str, ...] = (
    "[PAD]", "[BOS]", "[EOS]", "[UNK]",
    "what", "digit", "is", "this", "?",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
    "a", "handwritten", ".", "describe", "the", "image", "shows", "number", "of", "yes", "no", "odd", "even",
)  # fmt: skip
DIGITS_QUESTION = "what digit is this ?"
DIGITS_CAPTION_PROMPT = "describe the image ."


class WordTokenizer:
    """A whitespace word-level tokenizer over a fixed vocabulary (the digits tasks need no download).

    Args:
        vocab: the words, in id order; must contain ``pad``, ``bos``, ``eos`` and ``unk``.

    Example:
        >>> tok = WordTokenizer(DIGITS_VOCAB)
        >>> tok.encode("what digit is this ? 7")
        [4, 5, 6, 7, 8, 16]
        >>> tok.decode([16, 2])
        '7'
    """

    def __init__(
        self, vocab: Sequence[str], pad: str = "[PAD]", bos: str = "[BOS]", eos: str = "[EOS]", unk: str = "[UNK]"
    ) -> None:
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        if len(self.index) != len(self.vocab):
            raise ValueError("WordTokenizer.vocab: words must be unique")
        missing = [w for w in (pad, bos, eos, unk) if w not in self.index]
        if missing:
            raise ValueError(f"WordTokenizer.vocab: missing special tokens {missing}")
        self.pad_token_id, self.bos_token_id = self.index[pad], self.index[bos]
        self.eos_token_id, self.unk_token_id = self.index[eos], self.index[unk]
        self._special = {self.pad_token_id, self.bos_token_id, self.eos_token_id}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_token_id) for w in text.split()]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        words = [
            self.vocab[i] for i in ids if 0 <= i < len(self.vocab) and not (skip_special_tokens and i in self._special)
        ]
        return " ".join(words)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "vocab.txt").write_text("\n".join(self.vocab) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> WordTokenizer:
        return cls((Path(folder) / "vocab.txt").read_text().split())


class HFTokenizer:
    """A Hugging Face tokenizer behind the small interface the formatter uses (no special tokens added)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None else 0)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=skip_special_tokens).strip()


def load_tokenizer(spec: str) -> WordTokenizer | HFTokenizer:
    """``"digits"`` (the shipped vocabulary), a folder with ``vocab.txt`` (a :class:`WordTokenizer`), or a local
    Hugging Face tokenizer folder (``AutoTokenizer``; nothing is downloaded)."""
    if spec == "digits":
        return WordTokenizer(DIGITS_VOCAB)
    folder = Path(spec)
    if (folder / "vocab.txt").is_file() and not (folder / "tokenizer_config.json").is_file():
        return WordTokenizer.from_pretrained(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer: {spec!r} is neither 'digits' nor a local tokenizer folder")
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes text; the ``assistant`` text of every gpt turn is labelled, the rest is not.

    Attributes:
        system: text before the first turn.
        user: format of a human turn (``{}`` is the message).
        assistant_prefix: unlabelled text that opens each gpt turn.
        assistant: format of the labelled answer (``{}`` is the message).
        assistant_suffix: unlabelled text after each gpt turn.
        user_image_only: the human turns contribute only their image (LLaVA's ``plain`` pretraining template).
        bos: prepend the tokenizer's BOS token (when it has one).
        eos: append the tokenizer's EOS token to each answer (labelled).
    """

    system: str = ""
    user: str = "{}"
    assistant_prefix: str = ""
    assistant: str = "{}"
    assistant_suffix: str = ""
    user_image_only: bool = False
    bos: bool = True
    eos: bool = True


_QWEN2_BASE_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions. "
)
_VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the human's questions. "
)
#: Chat templates by name: ``digits`` (the testbed: ``[BOS] <image> question answer [EOS]``), ``plain`` (LLaVA /
#: TinyLLaVA pretraining: image then caption), ``qwen2_base`` (TinyLLaVA's, used by LLaVA-KD's Qwen2 scripts),
#: ``chatml`` (Qwen chat, LLaVA-MoD's ``qwen`` template) and ``vicuna_v1`` (LLaVA-1.5).
TEMPLATES: dict[str, ChatTemplate] = {
    "digits": ChatTemplate(user="{} ", assistant="{}", bos=True, eos=True),
    "plain": ChatTemplate(user_image_only=True, assistant="{}\n", bos=False, eos=False),
    "qwen2_base": ChatTemplate(
        system=_QWEN2_BASE_SYSTEM, user="USER: {} ", assistant_prefix="ASSISTANT: ", assistant="{}<|endoftext|>",
        bos=False, eos=False,
    ),
    "chatml": ChatTemplate(
        system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", user="<|im_start|>user\n{}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n", assistant="{}<|im_end|>", assistant_suffix="\n",
        bos=False, eos=False,
    ),
    "vicuna_v1": ChatTemplate(
        system=_VICUNA_SYSTEM, user="USER: {} ", assistant_prefix="ASSISTANT:", assistant=" {}", bos=True, eos=True,
    ),
}


def _turns(conversations: Sequence[Mapping[str, str]], where: str) -> list[tuple[str, str]]:
    turns = []
    for turn in conversations:
        role = turn.get("from")
        if role not in ("human", "gpt"):
            raise ValueError(f"{where}: a turn's 'from' must be 'human' or 'gpt', got {role!r}")
        turns.append((role, str(turn.get("value", ""))))
    return turns


class ConversationFormatter:
    """Turns conversations into ``(input_ids, labels)`` with the template, expanding the image placeholder.

    Args:
        tokenizer: a :class:`WordTokenizer` or :class:`HFTokenizer`.
        template: a name of :data:`TEMPLATES` or a :class:`ChatTemplate`.
        max_length: sequences are cut to this many tokens (right truncation); a cut inside the visual tokens fails.
    """

    def __init__(self, tokenizer: Any, template: str | ChatTemplate = "digits", max_length: int = 2048) -> None:
        if isinstance(template, str):
            if template not in TEMPLATES:
                raise ValueError(f"template: unknown chat template {template!r}; expected one of {sorted(TEMPLATES)}")
            template = TEMPLATES[template]
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length

    def _text(self, text: str, image_ids: Sequence[int] | None, where: str) -> tuple[list[int], int]:
        parts = text.split(IMAGE_PLACEHOLDER)
        if len(parts) > 2:
            raise ValueError(f"{where}: more than one {IMAGE_PLACEHOLDER} in a sample (one image per sample)")
        if len(parts) == 2 and image_ids is None:
            raise ValueError(f"{where}: the text has {IMAGE_PLACEHOLDER} but the sample has no image")
        ids = self.tokenizer.encode(parts[0].strip()) if parts[0].strip() else []
        if len(parts) == 2:
            ids = ids + list(image_ids) + (self.tokenizer.encode(parts[1].strip()) if parts[1].strip() else [])
        return ids, len(parts) - 1

    def encode(
        self,
        conversations: Sequence[Mapping[str, str]],
        image_ids: Sequence[int] | None = None,
        where: str = "sample",
    ) -> tuple[list[int], list[int]]:
        """The token ids and labels of a conversation; a trailing human turn is left open as a prompt (it ends with
        the assistant prefix, ready for generation)."""
        t, tok = self.template, self.tokenizer
        ids: list[int] = [tok.bos_token_id] if t.bos and tok.bos_token_id is not None else []
        ids += tok.encode(t.system) if t.system else []
        labels = [IGNORE_INDEX] * len(ids)
        images = 0
        turns = _turns(conversations, where)
        if image_ids is not None and not any(IMAGE_PLACEHOLDER in v for r, v in turns if r == "human"):
            # LLaVA data puts the image in the first human turn; samples without the placeholder get it there.
            first = next((i for i, (r, _) in enumerate(turns) if r == "human"), None)
            if first is None:
                raise ValueError(f"{where}: a sample with an image needs a human turn")
            turns[first] = ("human", f"{IMAGE_PLACEHOLDER}\n{turns[first][1]}")
        for role, value in turns:
            if role == "human":
                if t.user_image_only:
                    value = IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in value else ""
                    seg, n = self._text(value, image_ids, where)
                else:
                    pre, _, post = t.user.partition("{}")
                    seg, n = self._text(f"{pre}{value}{post}" if pre or post else value, image_ids, where)
                images += n
                ids += seg
                labels += [IGNORE_INDEX] * len(seg)
                prefix = tok.encode(t.assistant_prefix) if t.assistant_prefix else []
                ids += prefix
                labels += [IGNORE_INDEX] * len(prefix)
            else:
                answer = tok.encode(t.assistant.format(value))
                if t.eos and tok.eos_token_id is not None:
                    answer = answer + [tok.eos_token_id]
                suffix = tok.encode(t.assistant_suffix) if t.assistant_suffix else []
                ids += answer + suffix
                labels += answer + [IGNORE_INDEX] * len(suffix)
        if image_ids is not None and images != 1:
            raise ValueError(f"{where}: the sample has an image but {images} placeholders in its human turns")
        if len(ids) > self.max_length:
            kept = ids[: self.max_length]
            if image_ids is not None and kept.count(image_ids[0]) != list(ids).count(image_ids[0]):
                raise ValueError(
                    f"{where}: max_length {self.max_length} cuts through the {len(image_ids)} visual tokens; "
                    "raise max_length"
                )
            ids, labels = kept, labels[: self.max_length]
        return ids, labels


def pad_sequences(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> Tensor:
    """Pads lists of ids to one (B, L) int64 tensor (on the right, or on the left for generation)."""
    length = max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if left:
                out[i, length - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            else:
                out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _collate_images(images: Sequence[Any]) -> dict[str, Tensor]:
    present = [im for im in images if im is not None]
    if not present:
        return {}
    if isinstance(present[0], Tensor):
        return {"pixel_values": torch.stack(present)}
    # Processor outputs: per-image tensors with a leading image (LLaVA) or patch (Qwen2-VL) dimension.
    return {k: torch.cat([im[k] for im in present]) for k in present[0]}


def _collate_text(items: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, Tensor]:
    ids = [it["input_ids"] for it in items]
    input_ids = pad_sequences(ids, pad_id)
    lengths = torch.tensor([len(s) for s in ids])
    attention_mask = (torch.arange(input_ids.shape[1])[None] < lengths[:, None]).long()
    labels = pad_sequences([it["labels"] for it in items], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class VLMCollate:
    """Pads a list of samples into a batch (see the module docstring for the layout)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if "chosen" in items[0]:
            batch: dict[str, Any] = {
                key: _collate_text([it[key] for it in items], self.pad_token_id) for key in ("chosen", "rejected")
            }
        else:
            batch = _collate_text(items, self.pad_token_id)
        batch["images"] = _collate_images([it.get("image") for it in items])
        if "answer" in items[0]:
            batch["answer"] = torch.tensor([it["answer"] for it in items])
        return batch


class ImagePipeline:
    """Loads and prepares one image, and gives the token ids that stand for it in the text.

    Without a processor (the zoo's LLaVA-style models): resize to ``image_size`` (bicubic), ``channels`` channels,
    normalise with ``mean``/``std``; the image is ``image_tokens`` copies of :data:`IMAGE_TOKEN_INDEX`. With a local
    Hugging Face ``processor``: its image processor prepares the image and the processor's own expansion of the
    image placeholder (``<image>`` for LLaVA, ``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen2-VL) gives the
    ids, so the number of visual tokens is whatever that model uses.
    """

    def __init__(
        self,
        image_tokens: int | None = None,
        image_size: int = 16,
        channels: int = 1,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        processor: str | None = None,
    ) -> None:
        self.image_size, self.channels = image_size, channels
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self.processor_path = processor
        self._processor: Any = None
        if processor is None:
            if image_tokens is None or image_tokens < 1:
                raise ValueError("image_tokens: the number of visual tokens per image is required without a processor")
            self.image_tokens: int | None = image_tokens
            self.image_token_id = IMAGE_TOKEN_INDEX
        else:
            self.image_tokens = None  # the processor decides (dynamic for Qwen2-VL)
            self.image_token_id = self._image_token_id()

    @property
    def processor(self) -> Any:
        if self._processor is None and self.processor_path is not None:
            from transformers import AutoProcessor

            if not Path(self.processor_path).is_dir():
                raise FileNotFoundError(f"processor: {self.processor_path!r} is not a local processor folder")
            self._processor = AutoProcessor.from_pretrained(self.processor_path, local_files_only=True)
        return self._processor

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers rebuild the processor
        return {**self.__dict__, "_processor": None}

    def _image_token_id(self) -> int:
        proc = self.processor
        token = getattr(proc, "image_token", None) or IMAGE_PLACEHOLDER
        return int(proc.tokenizer.convert_tokens_to_ids(token))

    def placeholder(self) -> str:
        """The text the processor expands into an image's tokens."""
        proc = self.processor
        token = getattr(proc, "image_token", None) or IMAGE_PLACEHOLDER
        start, end = getattr(proc, "vision_start_token", None), getattr(proc, "vision_end_token", None)
        tok = proc.tokenizer
        if start is None and "<|vision_start|>" in tok.get_vocab():
            start, end = "<|vision_start|>", "<|vision_end|>"
        return f"{start}{token}{end}" if start and end else token

    def tokenizer(self) -> HFTokenizer:
        return HFTokenizer(self.processor.tokenizer)

    def from_tensor(self, image: Tensor) -> tuple[Any, list[int]]:
        """``image``: (C, H, W) in [0, 1]."""
        if self.processor_path is None:
            x = image.float()
            if x.shape[-2:] != (self.image_size, self.image_size):
                x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bicubic",
                                  align_corners=False)[0].clamp(0, 1)
            if x.shape[0] != self.channels:
                x = x.mean(0, keepdim=True) if self.channels == 1 else x.expand(self.channels, -1, -1)
            return (x - self.mean) / self.std, [IMAGE_TOKEN_INDEX] * self.image_tokens
        rgb = image.float().expand(3, -1, -1) if image.shape[0] == 1 else image.float()
        array = rgb.permute(1, 2, 0).numpy()
        out = self.processor(text=[self.placeholder()], images=[array], return_tensors="pt", do_rescale=False)
        inputs = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        return inputs, [int(i) for i in out["input_ids"][0]]

    def from_file(self, path: str | os.PathLike) -> tuple[Any, list[int]]:
        from PIL import Image

        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        return self.from_tensor(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())


class ConversationDataset(Dataset):
    """LLaVA conversation records (``{"image": ..., "conversations": [...]}``) or RLAIF-V preference records
    (``{"image": ..., "question": ..., "chosen": ..., "rejected": ...}``, or ``conversations`` holding the prompt turns
    instead of ``question``), with images read lazily from files or given as tensors (``image_tensor``)."""

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        formatter: ConversationFormatter,
        images: ImagePipeline,
        image_folder: str | None = None,
        preference: bool = False,
        where: str = "data",
    ) -> None:
        self.records, self.formatter, self.images = list(records), formatter, images
        self.image_folder, self.preference, self.where = image_folder, preference, where

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, record: Mapping[str, Any]) -> tuple[Any, list[int] | None]:
        if "image_tensor" in record:
            return self.images.from_tensor(record["image_tensor"])
        if record.get("image"):
            path = Path(self.image_folder or "") / str(record["image"])
            if not path.is_file():
                raise FileNotFoundError(f"{self.where}: image not found: {path}")
            return self.images.from_file(path)
        return None, None

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        where = f"{self.where}[{index}]"
        image, image_ids = self._image(record)
        item: dict[str, Any] = {"image": image}
        if "answer" in record:
            item["answer"] = int(record["answer"])
        if not self.preference:
            if "conversations" not in record:
                raise ValueError(f"{where}: a conversation record needs 'conversations'")
            ids, labels = self.formatter.encode(record["conversations"], image_ids, where)
            return {**item, "input_ids": ids, "labels": labels}
        if "chosen" not in record or "rejected" not in record:
            raise ValueError(f"{where}: a preference record needs 'chosen' and 'rejected'")
        prompt = list(record.get("conversations") or [{"from": "human", "value": str(record.get("question", ""))}])
        for key in ("chosen", "rejected"):
            ids, labels = self.formatter.encode([*prompt, {"from": "gpt", "value": str(record[key])}], image_ids, where)
            item[key] = {"input_ids": ids, "labels": labels}
        return item


class VLMDataModule(ZooDataModule):
    """Shared base of the vision-language data modules: tokenizer, chat template, image pipeline and batching.

    Exposes what the VLM methods check against their models at setup: ``tokenizer``, ``vocab_size`` (of the
    tokenizer), ``image_token_id`` and ``image_tokens`` (visual tokens per image; ``None`` when a processor decides).
    ``num_classes`` is ``None`` (answers are text); ``in_chans`` is the image channels of the zoo's own pipeline.

    Args:
        tokenizer: ``"digits"``, a ``vocab.txt`` folder or a local Hugging Face tokenizer folder (ignored when
            ``processor`` is given: the processor's tokenizer is used).
        template: chat template name (:data:`TEMPLATES`).
        max_length: longest token sequence; longer ones are cut on the right.
        image_tokens: visual tokens per image for the zoo's LLaVA-style models ((image_size / patch)², CLS dropped).
        image_size, channels, mean, std: the zoo image pipeline (bicubic resize, normalisation).
        processor: a local Hugging Face processor folder (LLaVA-1.5, Qwen2-VL ...) for real VLMs.
        batch_size, eval_batch_size, num_workers, pin_memory, drop_last: see ``ZooDataModule``.
    """

    num_classes = None  # type: ignore[assignment]

    def __init__(
        self,
        tokenizer: str = "digits",
        template: str = "digits",
        max_length: int = 2048,
        image_tokens: int | None = None,
        image_size: int = 16,
        channels: int = 1,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        processor: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, drop_last)
        if template not in TEMPLATES:
            raise ValueError(
                f"{type(self).__name__}.template: unknown {template!r}; expected one of {sorted(TEMPLATES)}"
            )
        self.template, self.max_length = template, max_length
        self.image_size, self.channels, self.in_chans = image_size, channels, channels
        self.mean = tuple(mean) if mean is not None else (0.0,) * channels
        self.std = tuple(std) if std is not None else (1.0,) * channels
        self.images = ImagePipeline(image_tokens, image_size, channels, self.mean, self.std, processor)
        self.tokenizer = self.images.tokenizer() if processor else load_tokenizer(tokenizer)
        self.formatter = ConversationFormatter(self.tokenizer, template, max_length)
        self.predict_set: Dataset | None = None

    @property
    def image_token_id(self) -> int:
        return self.images.image_token_id

    @property
    def image_tokens(self) -> int | None:
        return self.images.image_tokens

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def collate(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return VLMCollate(self.tokenizer.pad_token_id)(items)

    def _vlm_loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a loader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train and self.drop_last and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=VLMCollate(self.tokenizer.pad_token_id),
        )

    def train_dataloader(self) -> DataLoader:
        return self._vlm_loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._vlm_loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._vlm_loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._vlm_loader(self.predict_set if self.predict_set is not None else self.test_set, train=False)


def load_digits_vqa(image_size: int = 16) -> tuple[Tensor, Tensor]:
    """The 1797 scikit-learn digits as (N, 1, S, S) images in [0, 1] (values / 16, nearest upsampling) and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="nearest")
    return images, torch.from_numpy(data.target.astype(np.int64))


class DigitsVQADataModule(VLMDataModule):
    """The digits VQA testbed: "what digit is this ?" → "<d>" on scikit-learn's digits (no download).

    Images: values / 16, nearest-upsampled to ``image_size``, split seeded and stratified into ``num_test`` test
    images and the rest for training (1400 / 397); the validation split is the test split (the testbed has none).
    Sequences (template ``digits``): ``[BOS] <image tokens> what digit is this ? <d> [EOS]`` with labels on ``<d>``
    and ``[EOS]``.

    Tasks (training split; validation and test are always VQA):
        vqa         the question above;
        caption     "describe the image ." → "a handwritten digit <d> ." (projector pretraining data);
        preference  pairs with the VQA prompt: chosen = the right digit, rejected = a wrong one (drawn once, seeded).

    Args:
        task: see above.
        train_samples: keep a stratified subset of this many training images (the testbed's 100 labelled images).
        num_test: held-out images.
        split_seed: seed of the split, the subset and the rejected digits.
        tokenizer, template, image_tokens, image_size, channels, mean, std, processor, batch_size, ...: see
            :class:`VLMDataModule` (defaults: the shipped vocabulary, 16 visual tokens of a 16×16 image in [0, 1]).
    """

    #: the test loader reads the validation split (publishing records its metrics as validation ones)
    test_split = "val"

    def __init__(
        self,
        task: Literal["vqa", "caption", "preference"] = "vqa",
        train_samples: int | None = None,
        num_test: int = 397,
        split_seed: int = 0,
        tokenizer: str = "digits",
        template: str = "digits",
        max_length: int = 64,
        image_tokens: int | None = 16,
        image_size: int = 16,
        channels: int = 1,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        processor: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
    ) -> None:
        super().__init__(tokenizer, template, max_length, image_tokens, image_size, channels, mean, std, processor,
                         batch_size, eval_batch_size, num_workers, pin_memory, drop_last)
        if task not in ("vqa", "caption", "preference"):
            raise ValueError(f"DigitsVQADataModule.task must be 'vqa', 'caption' or 'preference', got {task!r}")
        if not 10 <= num_test <= 1787:
            raise ValueError(f"DigitsVQADataModule.num_test must be in [10, 1787] (every digit), got {num_test}")
        self.task, self.train_samples, self.num_test, self.split_seed = task, train_samples, num_test, split_seed
        self._split: dict[str, tuple[Tensor, Tensor]] | None = None

    @property
    def name(self) -> str:
        return "digits_vqa"

    def splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{"train", "test"}: (images (N, 1, S, S) in [0, 1], labels)."""
        if self._split is None:
            from sklearn.model_selection import train_test_split

            images, labels = load_digits_vqa(self.image_size)
            idx = np.arange(len(labels))
            train, test = train_test_split(idx, test_size=self.num_test, stratify=labels.numpy(),
                                           random_state=self.split_seed)
            if self.train_samples is not None and self.train_samples < len(train):
                if self.train_samples < 10:
                    raise ValueError(f"DigitsVQADataModule.train_samples must be ≥ 10 (one per digit), got "
                                     f"{self.train_samples}")
                train, _ = train_test_split(train, train_size=self.train_samples, stratify=labels.numpy()[train],
                                            random_state=self.split_seed)
            self._split = {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
        return self._split

    def records(self, split: str, task: str) -> list[dict[str, Any]]:
        images, labels = self.splits()[split]
        rng = np.random.default_rng(self.split_seed)
        out = []
        for image, label in zip(images, labels.tolist()):
            question = DIGITS_CAPTION_PROMPT if task == "caption" else DIGITS_QUESTION
            answer = f"a handwritten digit {label} ." if task == "caption" else str(label)
            record: dict[str, Any] = {"image_tensor": image, "answer": label}
            if task == "preference":
                wrong = (label + int(rng.integers(1, 10))) % 10
                record.update(
                    {"question": f"{IMAGE_PLACEHOLDER}\n{question}", "chosen": answer, "rejected": str(wrong)}
                )
            else:
                record["conversations"] = [
                    {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"},
                    {"from": "gpt", "value": answer},
                ]
            out.append(record)
        return out

    def setup(self, stage: str | None = None) -> None:
        fmt, img = self.formatter, self.images
        self.train_set = ConversationDataset(self.records("train", self.task), fmt, img,
                                             preference=self.task == "preference", where="digits train")
        test = ConversationDataset(self.records("test", "vqa"), fmt, img, where="digits test")
        self.val_set = self.test_set = test  # the testbed's one held-out split serves both


def _read_records(path: str | None, field: str) -> list[dict[str, Any]] | None:
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"LlavaJsonDataModule.{field}: file not found: {file}")
    if file.suffix == ".jsonl":
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    data = json.loads(file.read_text())
    if not isinstance(data, list):
        raise ValueError(f"LlavaJsonDataModule.{field}: {file} must hold a JSON list of records")
    return data


class LlavaJsonDataModule(VLMDataModule):
    """LLaVA-format JSON from local files (``blip_laion_cc_sbu_558k.json``, ``llava_v1_5_mix665k.json``, ...), or
    RLAIF-V-style preference pairs.

    Conversation records: ``{"image": "coco/train2017/x.jpg", "conversations": [{"from": "human", "value":
    "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}`` (records without ``image`` are text-only).
    Preference records: ``{"image": ..., "question": ..., "chosen": ..., "rejected": ...}``. Image paths are relative
    to ``image_folder``. ``predict_json`` may hold records whose last turn is a question (no answer).

    Args:
        train_json, val_json, test_json, predict_json: ``.json`` (a list) or ``.jsonl`` files; ``test_json``
            defaults to ``val_json``.
        image_folder: root of the image paths.
        format: ``conversation`` or ``preference`` (training split; the others are conversations).
        tokenizer, template, max_length, image_tokens, image_size, channels, mean, std, processor, batch_size, ...:
            see :class:`VLMDataModule` (defaults: CLIP normalisation, 3 channels).
    """

    def __init__(
        self,
        train_json: str | None = None,
        val_json: str | None = None,
        test_json: str | None = None,
        predict_json: str | None = None,
        image_folder: str | None = None,
        format: Literal["conversation", "preference"] = "conversation",
        tokenizer: str = "digits",
        template: str = "chatml",
        max_length: int = 2048,
        image_tokens: int | None = None,
        image_size: int = 336,
        channels: int = 3,
        mean: list[float] | None = [0.48145466, 0.4578275, 0.40821073],
        std: list[float] | None = [0.26862954, 0.26130258, 0.27577711],
        processor: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        drop_last: bool = True,
    ) -> None:
        super().__init__(tokenizer, template, max_length, image_tokens, image_size, channels, mean, std, processor,
                         batch_size, eval_batch_size, num_workers, pin_memory, drop_last)
        if format not in ("conversation", "preference"):
            raise ValueError(f"LlavaJsonDataModule.format must be 'conversation' or 'preference', got {format!r}")
        self.train_json, self.val_json, self.test_json = train_json, val_json, test_json or val_json
        self.predict_json, self.image_folder, self.format = predict_json, image_folder, format

    @property
    def name(self) -> str:
        return Path(self.train_json or self.val_json or "llava").stem.lower()

    def _dataset(self, path: str | None, field: str, preference: bool = False) -> Dataset | None:
        records = _read_records(path, field)
        if records is None:
            return None
        return ConversationDataset(records, self.formatter, self.images, self.image_folder, preference, where=path)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._dataset(self.train_json, "train_json", self.format == "preference")
        self.val_set = self._dataset(self.val_json, "val_json")
        self.test_set = self._dataset(self.test_json, "test_json")
        self.predict_set = self._dataset(self.predict_json, "predict_json")

