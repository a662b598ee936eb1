"""Shakespeare in GPT-2 BPE tokens: train.bin / val.bin (uint16 ids, 90/10 split) and meta.json.
The tokenizer is built offline from data/tokenizers/gpt2.tiktoken."""
import os
import sys

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", ".."))
from tokenizer import GPT2_EOT, gpt2_encoding, write_meta  # noqa: E402

with open(os.path.join(here, "shakespeare.txt")) as f:
    text = f.read()
n = int(0.9 * len(text))
enc = gpt2_encoding()
for split, part in (("train", text[:n]), ("val", text[n:])):
    ids = np.array(enc.encode_ordinary(part), dtype=np.uint16)
    ids.tofile(os.path.join(here, f"{split}.bin"))
    print(f"{split}: {len(ids):,} tokens")
write_meta(here, {"tokenizer": "gpt2", "vocab_size": GPT2_EOT + 1})
