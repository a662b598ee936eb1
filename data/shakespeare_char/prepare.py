"""Character-level Shakespeare: train.bin / val.bin (uint16 ids, 90/10 split) and meta.json with the vocabulary."""
import os
import sys

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", ".."))
from tokenizer import write_meta  # noqa: E402

with open(os.path.join(here, "..", "shakespeare", "shakespeare.txt")) as f:
    text = f.read()
chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}
n = int(0.9 * len(text))
for split, part in (("train", text[:n]), ("val", text[n:])):
    ids = np.array([stoi[c] for c in part], dtype=np.uint16)
    ids.tofile(os.path.join(here, f"{split}.bin"))
    print(f"{split}: {len(ids):,} tokens")
write_meta(here, {"tokenizer": "char", "vocab_size": len(chars), "itos": chars})
print(f"vocabulary: {len(chars)} characters")
