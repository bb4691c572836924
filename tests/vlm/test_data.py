"""VQA data: LLaVA conversation JSON with chat templates and response-only labels, preference pairs, digits tasks."""

import json

import numpy as np
import pytest
import torch

from zoo.data.vqa import (
    DIGITS_VOCAB,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    ConversationFormatter,
    DigitsVQADataModule,
    LlavaJsonDataModule,
    WordTokenizer,
    load_tokenizer,
)


def test_digits_vqa_sequence_and_labels():
    dm = DigitsVQADataModule(train_samples=100)
    dm.setup("fit")
    tok = dm.tokenizer
    assert len(dm.train_set) == 100 and len(dm.test_set) == 397 and dm.val_set is dm.test_set
    assert tok.vocab_size == 32 == len(DIGITS_VOCAB)
    item = dm.train_set[0]
    digit = item["answer"]
    expected = [tok.bos_token_id] + [IMAGE_TOKEN_INDEX] * 16 + tok.encode(f"what digit is this ? {digit}")
    assert item["input_ids"] == expected + [tok.eos_token_id]
    assert item["labels"] == [IGNORE_INDEX] * 22 + [tok.index[str(digit)], tok.eos_token_id]
    assert item["image"].shape == (1, 16, 16) and 0 <= float(item["image"].min()) <= float(item["image"].max()) <= 1
    labels = torch.stack([torch.tensor(dm.train_set[i]["answer"]) for i in range(100)])
    assert torch.bincount(labels).tolist() == [10] * 10  # a stratified subset


def test_digits_caption_and_preference_tasks():
    caption = DigitsVQADataModule(task="caption")
    caption.setup("fit")
    item = caption.train_set[0]
    answer = [t for t, lab in zip(item["input_ids"], item["labels"]) if lab != IGNORE_INDEX]
    assert caption.tokenizer.decode(answer) == f"a handwritten digit {item['answer']} ."
    pairs = DigitsVQADataModule(task="preference")
    pairs.setup("fit")
    tok = pairs.tokenizer
    for i in range(30):
        item = pairs.train_set[i]
        chosen = [t for t in item["chosen"]["labels"] if t != IGNORE_INDEX]
        rejected = [t for t in item["rejected"]["labels"] if t != IGNORE_INDEX]
        assert tok.decode(chosen) == str(item["answer"]) and tok.decode(rejected) != str(item["answer"])
        prompt = item["chosen"]["input_ids"][:-2]
        assert prompt == item["rejected"]["input_ids"][:-2]
    batch = pairs.collate([pairs.train_set[i] for i in range(4)])
    assert set(batch) == {"chosen", "rejected", "images", "answer"}
    assert batch["images"]["pixel_values"].shape == (4, 1, 16, 16)
    assert pairs.val_set is pairs.test_set and "input_ids" in pairs.val_set[0]  # evaluation stays VQA


def _write_llava(tmp_path):
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.fromarray((np.random.rand(20, 24, 3) * 255).astype(np.uint8)).save(tmp_path / name)
    records = [
        {"image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat digit is this ?"}, {"from": "gpt", "value": "7"},
            {"from": "human", "value": "is this odd ?"}, {"from": "gpt", "value": "yes"}]},
        {"conversations": [{"from": "human", "value": "describe the image ."}, {"from": "gpt", "value": "no"}]},
        {"image": "b.png", "conversations": [{"from": "human", "value": "what digit is this ?"},
                                             {"from": "gpt", "value": "3"}]},
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    pairs = [{"image": "b.png", "question": "<image>\nwhat digit is this ?", "chosen": "3", "rejected": "8"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))


def test_llava_json_multi_turn_labels_and_text_only_samples(tmp_path):
    _write_llava(tmp_path)
    dm = LlavaJsonDataModule(train_json=str(tmp_path / "train.json"), val_json=str(tmp_path / "train.json"),
                             image_folder=str(tmp_path), template="digits", image_tokens=4, image_size=8,
                             batch_size=3, num_workers=0, pin_memory=False)
    dm.setup("fit")
    tok = dm.tokenizer
    first = dm.train_set[0]
    answers = [t for t, lab in zip(first["input_ids"], first["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(answers) == "7 yes"  # every gpt turn (with its [EOS]) is labelled, nothing else
    assert first["input_ids"].count(IMAGE_TOKEN_INDEX) == 4 and first["image"].shape == (3, 8, 8)
    assert dm.train_set[1]["image"] is None and IMAGE_TOKEN_INDEX not in dm.train_set[1]["input_ids"]
    third = dm.train_set[2]  # no <image> in the text: the image goes before the first question, as LLaVA
    assert third["input_ids"][1:5] == [IMAGE_TOKEN_INDEX] * 4
    assert len(next(iter(dm.train_dataloader()))["input_ids"]) == 3
    batch = dm.collate([dm.train_set[i] for i in range(3)])
    assert batch["images"]["pixel_values"].shape == (2, 3, 8, 8)  # the two samples with an image
    assert batch["attention_mask"].sum(1).tolist() == [len(dm.train_set[i]["input_ids"]) for i in range(3)]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    prefs = LlavaJsonDataModule(train_json=str(tmp_path / "pairs.jsonl"), image_folder=str(tmp_path),
                                format="preference", template="digits", image_tokens=4, image_size=8)
    prefs.setup("fit")
    item = prefs.train_set[0]
    assert tok.decode([t for t in item["rejected"]["labels"] if t != IGNORE_INDEX]) == "8"


def test_chat_templates_label_only_the_answers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(DIGITS_VOCAB) + ["<|im_start|>", "<|im_end|>", "user", "assistant", "system", "You", "are",
                                  "helpful", "assistant."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="<|im_end|>",
                            additional_special_tokens=["<|im_start|>", "<|im_end|>"]).save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))  # a local Hugging Face tokenizer folder
    conv = [{"from": "human", "value": "what digit is this ?"}, {"from": "gpt", "value": "4"}]
    ids, labels = ConversationFormatter(tok, "chatml").encode(conv)
    labelled = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    vocab = {w: i for i, w in enumerate(words)}
    assert labelled == [vocab["4"], vocab["<|im_end|>"]]  # the answer and its end token (LLaVA-MoD's qwen template)
    assert ids[:2] == [vocab["<|im_start|>"], vocab["system"]] and ids[-1] == vocab["<|im_end|>"]
    assert labels[-1] == vocab["<|im_end|>"] and ids.count(vocab["assistant"]) == 1
    tok = WordTokenizer(DIGITS_VOCAB)
    plain_ids, plain_labels = ConversationFormatter(tok, "plain").encode(
        [{"from": "human", "value": "<image>\nwhat digit is this ?"}, {"from": "gpt", "value": "a handwritten 4"}],
        image_ids=[IMAGE_TOKEN_INDEX] * 3)
    assert plain_ids == [IMAGE_TOKEN_INDEX] * 3 + tok.encode("a handwritten 4")  # pretraining: image, then caption
    assert plain_labels == [IGNORE_INDEX] * 3 + tok.encode("a handwritten 4")


def test_refusals():
    tok = load_tokenizer("digits")
    fmt = ConversationFormatter(tok, "digits", max_length=10)
    conv = [{"from": "human", "value": "<image>\nwhat digit is this ?"}, {"from": "gpt", "value": "4"}]
    with pytest.raises(ValueError, match="cuts through the 16 visual tokens"):
        fmt.encode(conv, image_ids=[IMAGE_TOKEN_INDEX] * 16)
    ids, _ = ConversationFormatter(tok, "digits", max_length=20).encode(conv, image_ids=[IMAGE_TOKEN_INDEX] * 16)
    assert len(ids) == 20
    with pytest.raises(ValueError, match="more than one <image>"):
        fmt.encode([{"from": "human", "value": "<image> <image>"}], image_ids=[IMAGE_TOKEN_INDEX])
    with pytest.raises(ValueError, match="'human' or 'gpt'"):
        fmt.encode([{"from": "user", "value": "hi"}])
    with pytest.raises(ValueError, match="unknown chat template"):
        ConversationFormatter(tok, "llama9")
    with pytest.raises(FileNotFoundError, match="train_json"):
        LlavaJsonDataModule(train_json="/nonexistent.json", image_tokens=4).setup("fit")
    with pytest.raises(ValueError, match="image_tokens"):
        LlavaJsonDataModule(train_json="x.json")
