"""OpenWebText in GPT-2 BPE tokens, through Hugging Face `datasets` (needs a network and about 60 GB of disk).
Writes train.bin / val.bin (uint16 ids, each document followed by <|endoftext|>) and meta.json."""
import os
import sys

import numpy as np
from tqdm import tqdm

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", ".."))
from tokenizer import GPT2_EOT, gpt2_encoding, write_meta  # noqa: E402

num_proc = max(1, (os.cpu_count() or 2) // 2)

if __name__ == "__main__":
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("data/openwebtext/prepare.py: needs the 'datasets' package (pip install datasets)")
    try:
        dataset = load_dataset("openwebtext", num_proc=num_proc, trust_remote_code=True)
    except Exception as e:  # offline, hub unreachable, or the dataset moved
        sys.exit(f"data/openwebtext/prepare.py: could not download 'openwebtext' from the Hugging Face hub "
                 f"(a network is needed): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    split = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split["val"] = split.pop("test")
    enc = gpt2_encoding()

    def tokenize(example):
        ids = enc.encode_ordinary(example["text"]) + [GPT2_EOT]
        return {"ids": ids, "len": len(ids)}

    tokenized = split.map(tokenize, remove_columns=["text"], desc="tokenizing", num_proc=num_proc)
    for name, dset in tokenized.items():
        arr = np.memmap(os.path.join(here, f"{name}.bin"), dtype=np.uint16, mode="w+", shape=(int(np.sum(dset["len"])),))
        idx, shards = 0, 1024
        for i in tqdm(range(shards), desc=f"writing {name}.bin"):
            batch = np.concatenate(dset.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")["ids"])
            arr[idx: idx + len(batch)] = batch
            idx += len(batch)
        arr.flush()
    write_meta(here, {"tokenizer": "gpt2", "vocab_size": GPT2_EOT + 1})
