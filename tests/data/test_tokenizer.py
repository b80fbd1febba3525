from __future__ import annotations

import pytest

from moekit.data import EOS_TOKEN, BPETokenizer, TokenizerConfig

TRICKY = [
    "",
    "plain ascii text.",
    "naïve café — «quotes» 日本語のテキスト 🤖🚀 \u200b zero-width",
    "def f(x):\n\tif x:\r\n        return  x   \n\n\n    # trailing   \n",
    "\x00\x01 control \x7f bytes",
    f"a literal {EOS_TOKEN} inside a document",
    "   leading and trailing spaces   ",
    "ЁЖЩ greek αβγ arabic العربية hebrew עברית",
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert all(0 <= i < tiny_tokenizer.vocab_size for i in ids)


def test_literal_special_token_text_is_not_the_eos_id(tiny_tokenizer):
    ids = tiny_tokenizer.encode(f"x {EOS_TOKEN} y")
    assert tiny_tokenizer.eos_id not in ids
    assert tiny_tokenizer.decode([tiny_tokenizer.eos_id]) == EOS_TOKEN


def test_vocab_size_eos_and_merges(tiny_tokenizer):
    assert tiny_tokenizer.vocab_size == 320
    assert tiny_tokenizer.eos_id == 0
    # merges learned: a frequent training word is one token, far fewer ids than bytes
    assert len(tiny_tokenizer.encode(" the")) == 1
    assert len(tiny_tokenizer.encode("the quick brown fox")) < len("the quick brown fox") / 2


def test_encode_batch_matches_encode(tiny_tokenizer):
    assert tiny_tokenizer.encode_batch(TRICKY) == [tiny_tokenizer.encode(t) for t in TRICKY]


def test_save_load_same_ids(tiny_tokenizer, tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    tiny_tokenizer.save(path)
    loaded = BPETokenizer.load(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary left behind
    for text in TRICKY:
        assert loaded.encode(text) == tiny_tokenizer.encode(text)
    assert loaded.eos_id == tiny_tokenizer.eos_id and loaded.vocab_size == tiny_tokenizer.vocab_size


def test_load_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        BPETokenizer.load(tmp_path / "nothing.json")


def test_config_rejects_too_small_vocab():
    with pytest.raises(ValueError, match=r"vocab_size must be an int >= 257.*found 100"):
        TokenizerConfig(vocab_size=100)
