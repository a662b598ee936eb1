"""Data preparation and tokenizers, offline."""
import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import ROOT, run_script
from tokenizer import Tokenizer, gpt2_encoding


def test_char_dataset_is_a_90_10_split_of_the_corpus(char_data):
    with open(os.path.join(ROOT, "data", "shakespeare", "shakespeare.txt")) as f:
        text = f.read()
    with open(os.path.join(char_data, "meta.json")) as f:
        meta = json.load(f)
    train = np.fromfile(os.path.join(char_data, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(char_data, "val.bin"), dtype=np.uint16)
    assert len(train) + len(val) == len(text) and len(train) == int(0.9 * len(text))
    tok = Tokenizer(meta)
    assert tok.decode(val[:500].tolist()) == text[len(train):len(train) + 500]
    assert meta["vocab_size"] == len(set(text))


def test_gpt2_tokenizer_is_offline_and_gives_gpt2_ids():
    enc = gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257


def test_bpe_prepare_writes_gpt2_tokens(tmp_path):
    run_script("data/shakespeare/prepare.py")
    folder = os.path.join(ROOT, "data", "shakespeare")
    val = np.fromfile(os.path.join(folder, "val.bin"), dtype=np.uint16)
    with open(os.path.join(folder, "meta.json")) as f:
        tok = Tokenizer(json.load(f))
    assert tok.vocab_size == 50257 and val.max() < 50257
    with open(os.path.join(folder, "shakespeare.txt")) as f:
        text = f.read()
    assert tok.decode(val[:200].tolist()) in text


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed: would try the network")
def test_openwebtext_without_datasets_says_what_is_missing():
    result = run_script("data/openwebtext/prepare.py", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["data/openwebtext/prepare.py: needs the 'datasets' package "
                                                  "(pip install datasets)"]
