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
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run the dataset's prepare.py first")
    with open(path) as f:
        return json.load(f)


def write_meta(data_dir, meta):
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
