"""save_weights.py: codes in range and in one byte, dequantized equal to the model's effective weights and to
the activations the model passed on, the same values in every format, and pickles that run code refused."""
import os
import pickle

import numpy as np
import pytest
import torch

from checkpoint import save_checkpoint
from inference import load_checkpoint
from quantization.layers import stored_activations
from conftest import run_script
from model import GPT, GPTConfig
from quantization.layers import ActQuant, QuantizedLinear
from quantization.save_weights import load_quantized_data


def code_limits(method, bits):
    """The integer range of a b-bit code, written out here independently of quantizers.code_range."""
    return {"symmetric_quant": (-2 ** (bits - 1), 2 ** (bits - 1) - 1), "affine_quant": (0, 2 ** bits - 1),
            "ternary_quant": (-1, 1)}[method]


def dequantized(tensor):
    """Row i of the codes (rows = len(scale)) times its scale, after its zero point: the documented format."""
    rows = tensor["codes"].reshape(len(tensor["scale"]), -1).astype(np.float32)
    return ((rows - tensor["zero_point"]) * tensor["scale"]).reshape(tensor["shape"])


def load_model(out_dir):
    checkpoint = load_checkpoint(out_dir)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    model.set_quantization(True)
    return model.eval(), checkpoint


@pytest.fixture(scope="module")
def saved(quant_saved):
    return {file_type: load_quantized_data(path)["tensors"] for file_type, path in quant_saved.items()}


def test_the_script_runs_from_the_repo_root(quant_ckpt, tmp_path):
    result = run_script("quantization/save_weights.py", f"--out_dir={quant_ckpt}",
                        f"--file_name={tmp_path}/q", "--file_type=npz", "--snr_batch_size=0")
    assert "saved 13 weights and 24 activations" in result.stdout
    assert os.path.exists(tmp_path / "q.npz")


def test_codes_lie_in_the_b_bit_range_in_one_byte(saved):
    tensors = saved["pkl"]
    assert len(tensors) == 13 + 24  # 2 layers x 6 linear sites, the embedding, 2 layers x 12 activation sites
    for name, t in tensors.items():
        qmin, qmax = code_limits(t["method"], t["bits"])
        assert (t["qmin"], t["qmax"]) == (qmin, qmax), name
        assert qmin <= t["codes"].min() and t["codes"].max() <= qmax, name
        assert t["codes"].dtype in (np.int8, np.uint8), f"{name}: {t['codes'].dtype}"
        assert t["codes"].dtype == (np.uint8 if qmax > 127 else np.int8), name
        assert list(t["codes"].shape) == t["shape"]


def test_the_fields_say_how_each_tensor_was_quantized(saved):
    t = saved["pkl"]
    q, v, up = (t[f"transformer.h.1.{s}.weight"] for s in ("attn.q", "attn.v", "mlp.mlp_up"))
    assert (q["method"], q["bits"], q["granularity"]) == ("symmetric_quant", 4, "per_channel")
    assert (v["method"], v["bits"]) == ("affine_quant", 4)
    assert (up["granularity"], up["group_size"], up["bits"], up["shape"]) == ("per_group", 16, 8, [128, 32])
    assert t["transformer.h.0.mlp.mlp_down.weight"]["method"] == "ternary_quant"
    assert up["scale"].shape == (128 * 32 // 16, 1)
    act = t["transformer.h.0.mlp.act.activation_output"]
    assert (act["kind"], act["method"], act["bits"], act["granularity"]) == ("activation", "affine_quant", 3, "per_token")
    assert t["transformer.h.0.attn.act.softmax_input"]["bits"] == 8
    assert t["transformer.wte.weight"]["kind"] == "weight"


def test_dequantized_weights_equal_what_the_model_computes_with(quant_ckpt, saved):
    model, _ = load_model(quant_ckpt)
    tensors = saved["pkl"]
    with torch.no_grad():
        effective = {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
        effective["transformer.wte.weight"] = model.token_embedding_weight()
        assert len(effective) == 13
        for name, weight in effective.items():
            assert np.array_equal(dequantized(tensors[name]), weight.numpy()), name
            latent = model.transformer.wte.weight if name == "transformer.wte.weight" else \
                model.get_parameter(name.replace(".weight", ".parametrizations.weight.original"))
            assert not torch.equal(weight, latent), f"{name}: the model computes with its latent weight"


def test_dequantized_activations_equal_what_the_model_passed_on(quant_ckpt, tmp_path):
    """Run a fresh batch, keep what each activation site output, store it in a checkpoint and save that."""
    model, checkpoint = load_model(quant_ckpt)
    outputs, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, ActQuant) and module.active:
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.clone())))
    idx = torch.randint(0, model.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    checkpoint["activations"] = stored_activations(model)
    save_checkpoint(str(tmp_path / "ckpt.pt"), checkpoint)
    from quantization import save_weights
    save_weights.main([f"--out_dir={tmp_path}", f"--file_name={tmp_path}/q.safetensors", "--file_type=safetensors",
                       "--snr_batch_size=0"])
    tensors = load_quantized_data(str(tmp_path / "q.safetensors"))["tensors"]
    assert sorted(n for n, t in tensors.items() if t["kind"] == "activation") == sorted(outputs)
    for name, out in outputs.items():
        assert tensors[name]["shape"] == list(out.shape)
        np.testing.assert_allclose(dequantized(tensors[name]), out.numpy(), rtol=0, atol=1e-6, err_msg=name)


def test_every_format_holds_the_same_values(saved):
    reference = saved["pkl"]
    for file_type in ("safetensors", "npz"):
        tensors = saved[file_type]
        assert list(tensors) == list(reference)
        for name, t in reference.items():
            assert set(tensors[name]) == set(t)
            for key, value in t.items():
                other = tensors[name][key]
                if isinstance(value, np.ndarray):
                    assert other.dtype == value.dtype and np.array_equal(other, value), (file_type, name, key)
                else:
                    assert other == value, (file_type, name, key)


def test_weight_snr_terms_come_from_the_latent_weights(quant_ckpt, saved):
    model, _ = load_model(quant_ckpt)
    t = saved["npz"]["transformer.h.0.mlp.mlp_down.weight"]
    latent = model.transformer.h[0].mlp.mlp_down.parametrizations.weight.original.detach().double().numpy()
    assert t["signal_sq"] == pytest.approx((latent ** 2).sum(), rel=1e-9)
    assert t["noise_sq"] == pytest.approx(((latent - dequantized(t)) ** 2).sum(), rel=1e-6)
    assert all(t["signal_sq"] > 0 and t["noise_sq"] > 0 for t in saved["npz"].values())  # activations measured too


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_pickle_that_runs_code_is_refused_without_running_it(quant_saved, tmp_path):
    data = load_quantized_data(quant_saved["pkl"])
    data["tensors"]["transformer.wte.weight"]["method"] = Payload(tmp_path / "ran")
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match=r"refused.*builtins\.exec"):
        load_quantized_data(str(path))
    assert not (tmp_path / "ran").exists()
    result = run_script("quantization/visualize.py", f"--file_name={path}", f"--image_folder={tmp_path}/img",
                        check=False)
    assert result.returncode != 0 and "refused" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ran").exists()
    pickle.loads(path.read_bytes())  # the payload is live: an unrestricted unpickler runs it
    assert (tmp_path / "ran").read_text() == "ran"


@pytest.mark.parametrize("make", ["plain pickle", "torch checkpoint", "other npz", "text", "no tensors key"])
def test_a_file_not_saved_by_this_tool_is_refused(make, quant_ckpt, tmp_path):
    path = {"plain pickle": "x.pkl", "torch checkpoint": "ckpt.pkl", "other npz": "x.npz", "text": "x.safetensors",
            "no tensors key": "y.pkl"}[make]
    path = str(tmp_path / path)
    if make == "plain pickle":
        pickle.dump({"weights": np.zeros(3)}, open(path, "wb"))
    elif make == "torch checkpoint":
        open(path, "wb").write(open(os.path.join(quant_ckpt, "ckpt.pt"), "rb").read())
    elif make == "other npz":
        np.savez(path, a=np.zeros(3))
    elif make == "text":
        open(path, "w").write("hello")
    else:
        pickle.dump({"format": "nanoQAT quantized tensors", "version": 1}, open(path, "wb"))
    with pytest.raises(ValueError) as e:
        load_quantized_data(path)
    assert path in str(e.value) and ("not a file saved by save_weights.py" in str(e.value) or "refused" in str(e.value))


def test_bits_outside_2_to_8_in_a_file_are_refused(quant_saved, tmp_path):
    data = load_quantized_data(quant_saved["pkl"])
    data["tensors"]["transformer.h.0.attn.q.weight"]["bits"] = 9
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.q\.weight.*bits=9.*2\.\.8"):
        load_quantized_data(str(path))


def test_a_checkpoint_that_is_missing_is_one_clear_line(tmp_path):
    result = run_script("quantization/save_weights.py", f"--out_dir={tmp_path}/nothing", check=False)
    assert result.returncode != 0 and "not found" in result.stderr and len(result.stderr.strip().splitlines()) == 1
