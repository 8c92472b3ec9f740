"""Our tokenizer equals transformers' CLIPTokenizer built from the same (test-made) vocabulary files."""
from __future__ import annotations

import logging

import pytest
from refs import hf_tokenizer, write_vocab
from unclip.models import CLIPTokenizer

pytest.importorskip("transformers")

PROMPTS = [
    "horse",
    "",
    "A PHOTO of a Red Cat",
    "héllo wörld — naïve café",
    "a cat 🐱🚀 riding 🐎",
    "punctuation!!! (nested [brackets]) {x}, y; z: 'quoted' \"double\" it's we'll",
    "numbers 123 4567.89 1,000,000 3rd",
    "   extra\t\twhitespace \n\n here   ",
    "日本語のテキスト 中文",
    "word " * 100,
    "<|endoftext|> inside a prompt",
]


@pytest.fixture(scope="module", params=["!", "<|endoftext|>"])
def tokenizers(request, tmp_path_factory):
    folder = write_vocab(tmp_path_factory.mktemp("vocab"), pad_token=request.param)
    return CLIPTokenizer.from_folder(folder), hf_tokenizer(folder, pad_token=request.param), request.param


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_and_mask_equal_transformers(tokenizers, prompt):
    ours, ref, _ = tokenizers
    ids, mask = ours([prompt])
    enc = ref([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert ids.tolist() == enc.input_ids.tolist()
    assert mask.tolist() == enc.attention_mask.tolist()


def test_batch_and_pad_id(tokenizers):
    ours, ref, pad = tokenizers
    ids, mask = ours(PROMPTS)
    enc = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert ids.tolist() == enc.input_ids.tolist()
    assert mask.tolist() == enc.attention_mask.tolist()
    assert ours.pad_id == ref.convert_tokens_to_ids(pad)
    assert ids[1, 2].item() == ours.pad_id  # "" = BOS, EOS, then padding


def test_long_prompt_warns_with_count(tokenizers, caplog):
    ours, _, _ = tokenizers
    with caplog.at_level(logging.WARNING):
        ids, mask = ours(["horse " * 100])  # BOS + 100 single-token words + EOS
    assert int(mask.sum()) == 77 and ids[0, -1].item() == ours.eos_id
    assert any("the last 25 were dropped" in r.getMessage() for r in caplog.records), caplog.text


def test_tokenizer_json_folder_equals_vocab_files(tokenizers, tmp_path):
    ours, ref, pad = tokenizers
    ref.save_pretrained(str(tmp_path))  # transformers writes tokenizer.json
    from_json = CLIPTokenizer.from_folder(tmp_path)
    a, b = ours(PROMPTS), from_json(PROMPTS)
    assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
