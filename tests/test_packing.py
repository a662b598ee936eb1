"""Packed quantized checkpoints: codes pack into the expected number of bytes and round-trip exactly."""
import math
import os

import pytest
import torch

from inference import load_checkpoint
from model import GPT, GPTConfig
from quantization.packing import load_packed, pack_codes, packed_bytes, save_packed, unpack_codes
from quantization.rtn import rtn_quantize, weight_spec
from inference import load_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_round_trip_and_size(bits):
    codes = torch.randint(0, 1 << bits, (1001,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def test_four_bit_codes_are_two_per_byte_low_nibble_first():
    packed = pack_codes(torch.tensor([0x3, 0xA, 0xF, 0x1]), 4)
    assert packed.tolist() == [0xA3, 0x1F]
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]


def test_out_of_range_codes_refused():
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_codes(torch.tensor([16]), 4)


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=84, bias=True))


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (3, 0, True), (2, 16, False), (8, 64, True)])
def test_packed_checkpoint_round_trips_exactly(tmp_path, bits, group_size, sym):
    model = tiny_model()
    spec = weight_spec(bits, group_size, sym)
    records = rtn_quantize(model, spec)
    base = {"model_args": dict(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=84, bias=True),
            "dataset": "shakespeare_char"}
    path = tmp_path / "q" / "ckpt.pt"
    save_packed(str(path), base, model, records, {"method": "rtn", "bits": bits})
    loaded, _ = load_model(str(tmp_path / "q"), "cpu")
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    idx = torch.randint(0, 84, (2, 16))
    assert torch.equal(model.eval()(idx, idx)[0], loaded(idx, idx)[0])
    # every quantized weight takes exactly ceil(numel * bits / 8) bytes of codes
    checkpoint = load_checkpoint(str(path))
    n = sum(l.weight.numel() for l in (m for name, m in model.named_modules() if name in records))
    code_bytes, param_bytes = packed_bytes(checkpoint)
    assert code_bytes == sum(math.ceil(r.codes.numel() * bits / 8) for r in records.values())
    assert code_bytes <= n * bits / 8 + len(records)
    rows = sum(r.scale.numel() for r in records.values())
    assert param_bytes == rows * (4 + 1)  # float32 scale, one-byte zero point
    assert not any(f"{name}.weight" in checkpoint["model"] for name in records)


def test_four_bit_file_is_about_an_eighth_of_float32(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=16, vocab_size=84, bias=False))
    records = rtn_quantize(model, weight_spec(4, 128))
    save_packed(str(tmp_path / "ckpt.pt"), {"model_args": {}}, model, records, {})
    linear_fp32 = sum(r.codes.numel() * 4 for r in records.values())
    non_linear = sum(v.numel() * 4 for k, v in model.state_dict().items()
                     if not (k.endswith(".weight") and k[:-7] in records))
    size = os.path.getsize(tmp_path / "ckpt.pt") - non_linear
    assert size < linear_fp32 / 8 * 1.15  # a quarter of fp16, plus scales and zero points


def test_load_refuses_mismatched_model(tmp_path):
    model = tiny_model()
    rtn_quantize(model, weight_spec(4, 32))
    checkpoint = {"model": {k: v for k, v in model.state_dict().items() if "wte" not in k},
                  "packed_weights": {}, "model_args": {}}
    with pytest.raises(ValueError, match="does not match"):
        load_packed(tiny_model(), checkpoint)
