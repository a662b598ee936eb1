"""Tokenizers recorded with each dataset (data/<name>/meta.json): character-level, or GPT-2 BPE through
tiktoken built from the ranks file shipped in data/tokenizers/ (no network needed)."""
import json
import os

ROOT = os.path.dirname(os.path.abspath(__file__))
GPT2_RANKS = os.path.join(ROOT, "data", "tokenizers", "gpt2.tiktoken")
GPT2_EOT = 50256


def gpt2_encoding():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=load_tiktoken_bpe(GPT2_RANKS),
                             special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=GPT2_EOT + 1)


class Tokenizer:
    def __init__(self, meta):
        self.meta = meta
        self.vocab_size = meta["vocab_size"]
        if meta["tokenizer"] == "char":
            self.itos = meta["itos"]
            self.stoi = {c: i for i, c in enumerate(self.itos)}
        elif meta["tokenizer"] == "gpt2":
            self.enc = gpt2_encoding()
        else:
            raise ValueError(f"tokenizer '{meta['tokenizer']}' is unknown; expected char or gpt2")

    def encode(self, text):
        if self.meta["tokenizer"] == "char":
            unknown = sorted(set(text) - set(self.stoi))
            if unknown:
                raise ValueError(f"characters {unknown!r} are not in this dataset's vocabulary")
            return [self.stoi[c] for c in text]
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        if self.meta["tokenizer"] == "char":
            return "".join(self.itos[i] for i in ids)
        return self.enc.decode(ids)


def load_meta(data_dir):
    """The dataset's meta.json, checked: FileNotFoundError when missing, ValueError naming what is wrong."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run the dataset's prepare.py first")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(meta, dict) or meta.get("tokenizer") not in ("char", "gpt2"):
        raise ValueError(f"{path}: expected a 'tokenizer' of char or gpt2")
    vocab_size = meta.get("vocab_size")
    if type(vocab_size) is not int or not 1 <= vocab_size <= 2 ** 16:
        raise ValueError(f"{path}: 'vocab_size' must be an integer in 1..65536 (tokens are stored as uint16)")
    if meta["tokenizer"] == "char":
        itos = meta.get("itos")
        if not isinstance(itos, list) or len(itos) != vocab_size or not all(isinstance(c, str) for c in itos):
            raise ValueError(f"{path}: 'itos' must be a list of vocab_size={vocab_size} strings")
    elif vocab_size != GPT2_EOT + 1:
        raise ValueError(f"{path}: a gpt2 tokenizer has vocab_size {GPT2_EOT + 1}, not {vocab_size}")
    return meta


# token files this large are checked on an evenly spread sample (a full pass reads the whole file)
FULL_CHECK_TOKENS = 1 << 28


def check_token_file(path, vocab_size, min_tokens):
    """ValueError unless `path` is a flat uint16 token file of at least `min_tokens` tokens, all < vocab_size."""
    import numpy as np
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    size = os.path.getsize(path)
    if size % 2:
        raise ValueError(f"{path} has an odd size ({size} bytes): not a file of uint16 tokens")
    if size // 2 < min_tokens:
        raise ValueError(f"{path} holds {size // 2} tokens; at least {min_tokens} are needed (block_size + 1)")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    step = max(1, len(data) // FULL_CHECK_TOKENS)
    chunk = 1 << 24
    for start in range(0, len(data), chunk * step):
        top = int(data[start:start + chunk * step:step].max())
        if top >= vocab_size:
            raise ValueError(f"{path} holds token id {top}, beyond the vocabulary of {vocab_size} (wrong dataset?)")


def load_dataset(data_dir, block_size):
    """meta.json of a dataset folder whose train.bin and val.bin have been checked."""
    meta = load_meta(data_dir)
    for split in ("train", "val"):
        check_token_file(os.path.join(data_dir, f"{split}.bin"), meta["vocab_size"], block_size + 1)
    return meta


def write_meta(data_dir, meta):
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
