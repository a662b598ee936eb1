"""Fuzz every script's flags and file loaders with generated bad values and damaged files. For each case: a
non-zero exit, exactly one line of error naming the flag or file, no traceback, and no file created or changed
outside the test's temp folder (the repository's files are snapshotted before and after)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample
import train as train_script
from checkpoint import save_checkpoint
from inference import load_checkpoint
from configurator import build_parser
from conftest import ROOT, TINY, load_script, run_main, train_in_process
from quantization import gguf_export, hf, perplexity, save_weights, visualize
from quantization.quantizers import QuantSpec, quantize_tensor


def load_demo(name):
    return load_script(f"demos/{name}.py")


autoround_ptq, ptq_compare = load_demo("autoround_ptq"), load_demo("ptq_compare")
spinquant_ptq = load_demo("spinquant_ptq")


def snapshot(*folders):
    """{path: (size, mtime)} of every file under the folders (the repository without .git, caches and virtual
    environments)."""
    out = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            # not a virtual environment kept in the checkout (.venv is git-ignored): no script writes there, and
            # walking it takes minutes
            dirnames[:] = [d for d in dirnames if d not in (".git", "__pycache__", ".pytest_cache")
                           and not os.path.exists(os.path.join(dirpath, d, "pyvenv.cfg"))]
            for f in filenames:
                path = os.path.join(dirpath, f)
                st = os.lstat(path)
                out[path] = (st.st_size, st.st_mtime_ns)
    return out


class Cases:
    """Runs refused cases in-process and collects every way they fail to be refused cleanly."""

    def __init__(self, capsys, *watched):
        self.capsys, self.watched, self.failures, self.count = capsys, watched, [], 0
        self.last = None  # the snapshot the previous case ended with

    def refused(self, main, argv, names, absent=(), every=()):
        """main(argv) must exit non-zero with one line naming one of `names` (and each of `every`), print nothing
        else to stderr, and leave the repository and the `watched` folders untouched and none of `absent` created."""
        # the files as the previous case left them (checked at its end): one walk of the repository per case, not
        # two. A change made between two cases is charged to the second: reported, never missed
        before = self.last if self.last is not None else snapshot(ROOT, *self.watched)
        self.last = None
        self.capsys.readouterr()
        self.count += 1
        try:
            error = run_main(main, *argv)
        except Exception as e:  # noqa: BLE001 - a traceback is what this test looks for
            self.failures.append(f"{argv}: raised {type(e).__name__}: {str(e)[:200]}")
            return
        err = self.capsys.readouterr().err
        if error is None:
            self.failures.append(f"{argv}: accepted")
        elif "\n" in error or "Traceback" in error or err.strip():
            self.failures.append(f"{argv}: not one line: {error!r} {err[-300:]!r}")
        elif not any(n in error for n in names):
            self.failures.append(f"{argv}: names none of {names}: {error}")
        elif not all(n in error for n in every):
            self.failures.append(f"{argv}: does not name all of {every}: {error}")
        after = snapshot(ROOT, *self.watched)
        if after != before:
            self.failures.append(f"{argv}: changed files: {set(after.items()) ^ set(before.items())}")
        self.last = after
        for path in absent:
            if os.path.lexists(path):
                self.failures.append(f"{argv}: created {path}")

    def check(self):
        print(f"{self.count} cases")
        assert not self.failures, f"{len(self.failures)} of {self.count} cases:\n" + "\n".join(self.failures[:30])


# ---------------------------------------------------------------------------------------------------------------
# generated bad values for every flag of train.py (the command line and presets alike)

def bad_values(action, name):
    """Values no flag of this type accepts: wrong types, nan/inf, negative, zero where a count, huge."""
    from configurator import INT_MIN, BoolFlag
    from safety import finite_float
    if isinstance(action, BoolFlag):
        return ["maybe", "2"]
    if action.choices is not None:
        return ["no_such_choice", ""]
    if action.type is int:
        values = ["nan", "1.5", "True", "", "9" * 30, "-5", str(2 ** 31)]
        if INT_MIN.get(name, 1) >= 1:
            values.append("0")
        return values
    if action.type in (float, finite_float):
        values = ["nan", "inf", "-inf", "x", "1e400", "-5"]
        if name in ("beta1", "beta2", "dropout"):
            values.append("1")
        return values
    return []


def train_flags():
    for action in build_parser()._actions:
        if action.option_strings and action.dest not in ("help", "config"):
            for value in bad_values(action, action.dest):
                yield action.dest, value


def test_every_train_flag_refuses_bad_values(char_data, tmp_path, capsys):
    cases = Cases(capsys)
    out = tmp_path / "o"
    base = [f"--out_dir={out}", *TINY, "--max_iters=1", "--eval_interval=1"]
    for name, value in train_flags():
        cases.refused(train_script.main, [*base, f"--{name}={value}"], [f"--{name}"], absent=[out])
    for flags, named in [(["--n_embd=30", "--n_head=4"], "--n_embd"), (["--device=tpu"], "--device"),
                         (["--device=cuda:99"], "--device"), (["--dataset=../../etc"], "--dataset"),
                         (["--dataset="], "--dataset"), (["--init_from=nowhere"], "--init_from"),
                         (["--n_layer=100000", "--n_embd=100000", "--n_head=1"], "--n_layer"),
                         (["--out_dir="], "--out_dir"), (["--no-compile=True"], "--no-compile"),
                         (["--out_dir=/proc/nanoqat/run"], "--out_dir")]:
        cases.refused(train_script.main, [*base, *flags], [named], absent=[out])
    cases.check()
    assert cases.count > 500


def test_presets_get_the_checks_of_the_command_line(char_data, tmp_path, capsys):
    cases = Cases(capsys)
    out = tmp_path / "o"
    presets = ["max_iters = true", "max_iters = 2.7", 'learning_rate = "0.1"', "learning_rate = nan",
               "learning_rate = inf", "eval_iters = 0", "block_size = -1", 'quantize_linear_granularity = "per_row"',
               'linear_variant_mlp = "fancy"', "compile = 1", "n_layer = [1, 2]", "n_layer = {a = 1}",
               "no_such_flag = 1", 'config = "x.toml"', "n_layer = ", 'dataset = "../x"', "batch_size = 1e40",
               "dropout = 1.0", 'device = "quantum"', "seed = -1"]
    # tiny settings in the preset itself (the command line would override the bad value), minus the one tested
    tiny = dict(f[2:].split("=") for f in TINY)
    tiny.update(max_iters="1", eval_interval="1")
    for i, text in enumerate(presets):
        preset = tmp_path / f"p{i}.toml"
        key = text.split("=")[0].strip()
        lines = [f"{k} = {v if v.replace('.', '').isdigit() else repr(v)}" for k, v in tiny.items() if k != key]
        preset.write_text("\n".join(lines + [text]) + "\n")
        # the preset file and the key, except where the file is not TOML at all
        every = [str(preset)] + ([key] if text != "n_layer = " else [])
        cases.refused(train_script.main, [f"--out_dir={out}", f"--config={preset}"], [str(preset), f"--{key}"],
                      absent=[out], every=every)
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00n_layer = 1")
    for path in (tmp_path / "binary.toml", tmp_path / "missing.toml", tmp_path):
        cases.refused(train_script.main, [f"--out_dir={out}", f"--config={path}"], [str(path)], absent=[out])
    cases.check()


# ---------------------------------------------------------------------------------------------------------------
# damaged dataset folders

def write_dataset(folder, meta="default", train=None, val=None):
    os.makedirs(folder, exist_ok=True)
    tokens = np.arange(200, dtype=np.uint16) % 10
    if meta is not None:
        meta = {"tokenizer": "char", "vocab_size": 10, "itos": list("abcdefghij")} if meta == "default" else meta
        with open(os.path.join(folder, "meta.json"), "w") as f:
            f.write(meta if isinstance(meta, str) else json.dumps(meta))
    for name, data in (("train.bin", train), ("val.bin", val)):
        if data is not False:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(tokens.tobytes() if data is None else data)


def test_damaged_datasets_are_refused_by_name(tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    monkeypatch.setattr(train_script, "ROOT", str(root))
    good = {"tokenizer": "char", "vocab_size": 10, "itos": list("abcdefghij")}
    damaged = {
        "no_meta": dict(meta=None), "bad_json": dict(meta="{not json"), "meta_list": dict(meta="[1, 2]"),
        "no_tokenizer": dict(meta={"vocab_size": 10}), "odd_tokenizer": dict(meta={**good, "tokenizer": "bytes"}),
        "vocab_str": dict(meta={**good, "vocab_size": "10"}), "vocab_huge": dict(meta={**good, "vocab_size": 10 ** 9}),
        "short_itos": dict(meta={**good, "itos": ["a"]}), "gpt2_wrong_vocab": dict(meta={"tokenizer": "gpt2", "vocab_size": 7}),
        "odd_size": dict(train=b"\x00\x01\x02"), "empty": dict(train=b""), "too_short": dict(val=b"\x00\x00" * 10),
        "beyond_vocab": dict(train=np.full(100, 50, dtype=np.uint16).tobytes()), "no_val": dict(val=False),
    }
    cases = Cases(capsys, str(root))
    out = tmp_path / "o"
    for name, parts in damaged.items():
        write_dataset(root / "data" / name, **parts)
    os.makedirs(root / "data" / "meta_dir" / "meta.json")
    for name in [*damaged, "meta_dir", "missing"]:
        cases.refused(train_script.main, [f"--out_dir={out}", *TINY, f"--dataset={name}", "--max_iters=1"],
                      [f"--dataset={name}"], absent=[out])
    cases.check()


# ---------------------------------------------------------------------------------------------------------------
# damaged checkpoints, in every tool that reads one

@pytest.fixture(scope="module")
def tiny_ckpt(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz_ckpt")
    train_in_process(out, "--max_iters=2", "--eval_interval=2")
    return str(out)


def damaged_checkpoints(good):
    """{name: a function that damages a copy of the checkpoint dict (or returns raw bytes)}."""
    def edit(**changes):
        def make(ckpt):
            for key, value in changes.items():
                if key.startswith("args_"):
                    ckpt["model_args"][key[5:]] = value
                elif value is None:
                    ckpt.pop(key)
                else:
                    ckpt[key] = value
            return ckpt
        return make

    def state(fn):
        def make(ckpt):
            fn(ckpt["model"])
            return ckpt
        return make

    first = next(iter(good["model"]))
    return {
        "truncated": lambda c: open(good["path"], "rb").read()[:5000], "empty": lambda c: b"",
        "a_list": lambda c: [1, 2], "no_model_args": edit(model_args=None), "no_model": edit(model=None),
        "unknown_field": edit(args_fancy_new_field=1), "no_n_embd": lambda c: (c["model_args"].pop("n_embd"), c)[1],
        "n_embd_str": edit(args_n_embd="32"), "n_embd_bool": edit(args_n_embd=True),
        "n_head_mismatch": edit(args_n_head=3), "n_layer_huge": edit(args_n_layer=10 ** 12),
        "n_layer_zero": edit(args_n_layer=0), "dropout_nan": edit(args_dropout=float("nan")),
        "bad_variant": edit(args_linear_variants={"q": "fancy"}),
        "bits_40": edit(args_linear_variants={"q": "quantized_linear"}, args_weight_quant={"q": {"bits": 40}}),
        "missing_tensor": state(lambda s: s.pop(first)), "extra_tensor": state(lambda s: s.update(extra=torch.ones(1))),
        "wrong_shape": state(lambda s: s.update({first: torch.ones(3, 3)})),
        "nan_weight": state(lambda s: s[first].view(-1)[:1].fill_(float("nan"))),
        "inf_weight": state(lambda s: s[first].view(-1)[-1:].fill_(-float("inf"))),
        "model_not_tensors": edit(model={"a": 1}), "dataset_escape": edit(dataset="../../etc"),
        "dataset_int": edit(dataset=5),
    }


def test_damaged_checkpoints_are_refused_by_every_tool(tiny_ckpt, tmp_path, capsys):
    good = torch.load(os.path.join(tiny_ckpt, "ckpt.pt"), weights_only=True)
    good["path"] = os.path.join(tiny_ckpt, "ckpt.pt")
    cases = Cases(capsys, tiny_ckpt)
    folders = {}
    for name, damage in damaged_checkpoints(good).items():
        ckpt = torch.load(good["path"], weights_only=True)
        made = damage(ckpt)
        folder = tmp_path / name
        os.makedirs(folder)
        if isinstance(made, bytes):
            (folder / "ckpt.pt").write_bytes(made)
        else:
            torch.save(made, folder / "ckpt.pt")
        folders[name] = str(folder)
    os.makedirs(tmp_path / "ckpt_is_dir" / "ckpt.pt")
    folders["ckpt_is_dir"] = str(tmp_path / "ckpt_is_dir")
    for name, folder in folders.items():
        snapshot_folder = snapshot(folder)
        tools = [
            (train_script.main, [f"--out_dir={folder}", "--init_from=resume", "--device=cpu", "--max_iters=3"]),
            (sample.main, [f"--out_dir={folder}", "--device=cpu", "--max_new_tokens=2"]),
            (perplexity.main, [f"--out_dir={folder}", "--device=cpu", "--max_tokens=100", "--progress=False"]),
            (perplexity.main, [f"--out_dir={tiny_ckpt}", f"--quantized_dir={folder}", "--device=cpu",
                               "--max_tokens=100", "--progress=False"]),
            (save_weights.main, [f"--out_dir={folder}", f"--file_name={tmp_path / 'w'}"]),
            (autoround_ptq.main, [f"--out_dir={folder}", f"--quantized_dir={tmp_path / 'q'}", "--device=cpu"]),
            (ptq_compare.main, [f"--out_dir={folder}", "--device=cpu"]),
            (hf.main, ["export", f"--out_dir={folder}", f"--hf={tmp_path / 'hf'}"]),
        ]
        for main, argv in tools:
            cases.refused(main, argv, [folder], absent=[tmp_path / "w.pkl", tmp_path / "q", tmp_path / "hf"])
        if snapshot(folder) != snapshot_folder:
            cases.failures.append(f"{name}: the damaged checkpoint was changed")
    cases.check()


def test_a_checkpoint_that_asks_for_code_runs_nothing(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {}, "model_args": Payload()}, tmp_path / "ckpt.pt")
    for main, argv in [(sample.main, [f"--out_dir={tmp_path}", "--device=cpu"]),
                       (save_weights.main, [f"--out_dir={tmp_path}", f"--file_name={tmp_path / 'w'}"])]:
        error = run_main(main, *argv)
        assert error is not None and "asks for code" in error and "\n" not in error
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# flags of the other scripts

def test_other_scripts_refuse_bad_flags(tiny_ckpt, tmp_path, capsys):
    cases = Cases(capsys, tiny_ckpt)
    ck = f"--out_dir={tiny_ckpt}"
    table = {
        sample.main: ([ck, "--device=cpu", "--max_new_tokens=2"], {
            "--temperature": ["-1", "nan", "inf", "x"], "--top_k": ["0", "-3", "1.5", "x"],
            "--num_samples": ["0", "-1", "x", "9" * 20], "--max_new_tokens": ["0", "-1", "9" * 20],
            "--seed": ["-1", "9" * 30], "--start": [""], "--device": ["tpu", "cuda", "cuda:7"],
            "--dtype": ["float8"], "--compile": ["maybe"]}),
        perplexity.main: ([ck, "--device=cpu", "--progress=False"], {
            "--batch_size": ["0", "-1", "x"], "--seqlen": ["-1", "9" * 20, "100000"], "--stride": ["-1", "1000"],
            "--max_tokens": ["-1", "nan"], "--device": ["tpu", "cuda"], "--split": ["test"],
            "--text_file": [str(tmp_path / "missing.txt"), str(tmp_path)]}),
        save_weights.main: ([ck, f"--file_name={tmp_path / 'w'}"], {
            "--snr_batch_size": ["-1", "9" * 20], "--device": ["tpu", "cuda"], "--file_type": ["exe"]}),
        visualize.main: ([f"--image_folder={tmp_path / 'img'}"], {
            "--graph": ["pie"], "--file_name": [str(tmp_path / "missing.pkl"), str(tmp_path)]}),
        autoround_ptq.main: ([ck, f"--quantized_dir={tmp_path / 'q'}", "--device=cpu"], {
            "--bits": ["0", "9", "x"], "--group_size": ["-1", "7"], "--iters": ["-1"], "--lr": ["nan", "-1"],
            "--nsamples": ["0", "-1"], "--seqlen": ["-1", "1000"], "--batch_size": ["0"], "--damp_percent": ["nan"],
            "--eval_tokens": ["-1"], "--eval_batch_size": ["0"], "--device": ["tpu", "cuda"], "--seed": ["-1"],
            "--sites": ["q,nope"], "--method": ["magic"], "--calib_file": [str(tmp_path / "missing.txt")]}),
        ptq_compare.main: ([ck, "--device=cpu"], {
            "--bit_widths": ["4,x", "9", "", "4,,3"], "--methods": ["rtn,fancy"], "--w4_group_size": ["-2"],
            "--bits": ["0"], "--device": ["tpu"], "--eval_batch_size": ["0"]}),
        hf.main: (["import", f"--out_dir={tmp_path / 'imp'}", f"--hf={tmp_path / 'nohf'}"], {
            "--block_size": ["-1", "x"], "--dataset": ["../x", "shakespeare_char"]}),
    }
    for main, (base, flags) in table.items():
        for flag, values in flags.items():
            for value in values:
                cases.refused(main, [*base, f"{flag}={value}"], [flag],
                              absent=[tmp_path / p for p in ("w.pkl", "img", "q", "imp")])
    cases.refused(hf.main, ["sideways", "--hf=x", "--out_dir=y"], ["direction", "sideways"])
    cases.check()


# ---------------------------------------------------------------------------------------------------------------
# damaged and hostile files of save_weights.py, read by visualize.py

def saved_data(names=("transformer.h.0.attn.q.weight",)):
    spec = QuantSpec("symmetric_quant", 4, "per_channel")
    tensors = {}
    for name in names:
        w = torch.randn(4, 8)
        codes, scale, zero_point = quantize_tensor(w, spec)
        tensors[name] = save_weights.entry("weight", "q", spec, codes, scale, zero_point, w.shape)
    return {"format": save_weights.FORMAT, "version": save_weights.VERSION, "iter_num": 0,
            "quantization_enabled": True, "tensors": tensors}


def test_damaged_saved_tensors_are_refused_before_drawing(tmp_path, capsys):
    import pickle
    cases = Cases(capsys)
    name = "transformer.h.0.attn.q.weight"

    def tensor_edit(**fields):
        def make(data):
            data["tensors"][name].update(fields)
            return data
        return make

    damages = {
        "bits_40": tensor_edit(bits=40), "grid_40_bits": tensor_edit(qmin=-2 ** 39, qmax=2 ** 39 - 1, levels=2 ** 40),
        "bits_str": tensor_edit(bits="4"), "bits_bool": tensor_edit(bits=True), "shape_wrong": tensor_edit(shape=[8, 4]),
        "shape_negative": tensor_edit(shape=[-4, -8]), "scale_shape": tensor_edit(scale=np.ones((2, 3), np.float32)),
        "codes_bool": tensor_edit(codes=np.ones((4, 8), bool)), "method": tensor_edit(method="magic"),
        "codes_out_of_range": tensor_edit(codes=np.full((4, 8), 100, np.int8)), "no_field": lambda d: (
            d["tensors"][name].pop("qmin"), d)[1], "not_ours": lambda d: {"format": "other"},
        "version": lambda d: dict(d, version=99), "tensors_list": lambda d: dict(d, tensors=[1]),
    }
    files = []
    for key, damage in damages.items():
        for file_type in ("pkl", "npz"):
            path = tmp_path / f"{key}.{file_type}"
            data = damage(saved_data())
            if file_type == "pkl":
                path.write_bytes(pickle.dumps(data))
            else:
                try:
                    save_weights.save(data, str(path))
                except (KeyError, TypeError, AttributeError):
                    continue  # not expressible in this format
            files.append(path)
    good = tmp_path / "good.safetensors"
    save_weights.save(saved_data(), str(good))
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:100])
    (tmp_path / "text.npz").write_text("hello")
    (tmp_path / "code.pkl").write_bytes(pickle.dumps(os.system))
    (tmp_path / "wrong.ext").write_bytes(good.read_bytes())
    files += [tmp_path / f for f in ("truncated.safetensors", "text.npz", "code.pkl", "wrong.ext")]
    for path in files:
        cases.refused(visualize.main, [f"--file_name={path}", f"--image_folder={tmp_path / 'img'}"], [str(path)],
                      absent=[tmp_path / "img"])
    cases.check()


def test_names_inside_a_file_cannot_write_outside_the_image_folder(tmp_path, capsys):
    cases = Cases(capsys)
    outside = tmp_path / "outside"
    os.makedirs(outside)
    for i, hostile in enumerate([f"../../{outside.name}/x", str(outside / "x"), "..", "a/../../b", "\\\\server\\x"]):
        path = tmp_path / f"hostile{i}.pkl"
        save_weights.save(saved_data([hostile]), str(path))
        cases.refused(visualize.main, [f"--file_name={path}", f"--image_folder={tmp_path / 'img' / 'deep'}"],
                      [str(path)], absent=[tmp_path / "img"])
    assert os.listdir(outside) == []
    # a name with separators stays inside, with the separators replaced
    path = tmp_path / "slashes.safetensors"
    save_weights.save(saved_data(["a/b/c"]), str(path))
    assert run_main(visualize.main, f"--file_name={path}", f"--image_folder={tmp_path / 'img2'}") is None
    assert sorted(os.listdir(tmp_path / "img2")) == ["a_b_c_histogram.png", "overview.png"]
    # an image that is a symlink onto another file is never written through
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    os.remove(tmp_path / "img2" / "overview.png")
    os.symlink(victim, tmp_path / "img2" / "overview.png")
    cases.refused(visualize.main, [f"--file_name={path}", f"--image_folder={tmp_path / 'img2'}"],
                  ["--image_folder"])
    assert victim.read_text() == "keep"
    cases.check()


# ---------------------------------------------------------------------------------------------------------------
# outputs onto sources, and overwrites without asking

def source_links(tiny_ckpt, tmp_path, link_name):
    """(ckpt.pt, a symlink to the checkpoint's folder, a symlink `link_name` to its file, an empty folder
    `existing` for earlier results): what the output-safety tests aim outputs at."""
    ckpt = os.path.join(tiny_ckpt, "ckpt.pt")
    link_dir = tmp_path / "link_to_out"
    os.symlink(tiny_ckpt, link_dir)
    link_file = tmp_path / link_name
    os.symlink(ckpt, link_file)
    existing = tmp_path / "existing"
    os.makedirs(existing)
    return ckpt, link_dir, link_file, existing


def test_outputs_never_replace_sources_or_earlier_results(tiny_ckpt, tmp_path, capsys):
    cases = Cases(capsys, tiny_ckpt)
    ckpt, link_dir, link_file, existing = source_links(tiny_ckpt, tmp_path, "w.pkl")
    (existing / "ckpt.pt").write_bytes(b"earlier work")
    (existing / "rows.json").write_text("{}")
    (existing / "w.pkl").write_text("earlier")
    (existing / "config.json").write_text("{}")
    watch = snapshot(str(existing))
    cases.refused(autoround_ptq.main, [f"--out_dir={tiny_ckpt}", f"--quantized_dir={link_dir}", "--device=cpu"],
                  ["--quantized_dir"])
    cases.refused(autoround_ptq.main, [f"--out_dir={tiny_ckpt}", f"--quantized_dir={existing}", "--device=cpu"],
                  ["--overwrite"])
    cases.refused(ptq_compare.main, [f"--out_dir={tiny_ckpt}", f"--json={ckpt}", "--device=cpu"], ["--json"])
    cases.refused(ptq_compare.main, [f"--out_dir={tiny_ckpt}", f"--json={existing / 'rows.json'}", "--device=cpu"],
                  ["--overwrite"])
    cases.refused(save_weights.main, [f"--out_dir={tiny_ckpt}", f"--file_name={link_file}"], ["--file_name"])
    cases.refused(save_weights.main, [f"--out_dir={tiny_ckpt}", f"--file_name={existing / 'w.pkl'}"], ["--overwrite"])
    os.makedirs(existing / "folder.pkl")
    cases.refused(save_weights.main, [f"--out_dir={tiny_ckpt}", f"--file_name={existing / 'folder.pkl'}"],
                  ["--file_name"])
    cases.refused(train_script.main, [f"--out_dir={existing}", *TINY], ["--overwrite"])
    cases.refused(train_script.main, [f"--out_dir={ckpt}", *TINY], ["--out_dir"])
    cases.refused(hf.main, ["import", f"--hf={tmp_path / 'hf'}", f"--out_dir={existing}"], ["--overwrite"])
    cases.refused(hf.main, ["export", f"--out_dir={tiny_ckpt}", f"--hf={existing}"], ["--overwrite"])
    cases.refused(hf.main, ["export", f"--out_dir={tiny_ckpt}", f"--hf={link_dir}"], ["--out_dir", "--hf"])
    assert snapshot(str(existing)) == watch
    cases.check()


def test_newer_tools_never_replace_sources_or_earlier_results(tiny_ckpt, tmp_path, capsys):
    """gguf_export.py (export and import) and spinquant_ptq.py: an output onto the source (named directly, through
    a symlink, or a relative path) or onto an existing result without --overwrite is refused, nothing written."""
    cases = Cases(capsys, tiny_ckpt)
    ckpt, link_dir, link_file, existing = source_links(tiny_ckpt, tmp_path, "link.gguf")
    os.makedirs(existing / "a_folder.gguf")
    (existing / "ckpt.pt").write_bytes(b"earlier work")
    (existing / "model.gguf").write_bytes(b"earlier gguf")
    (existing / "ckpt_spinquant.pt").write_bytes(b"earlier alias")
    watch = snapshot(str(existing))
    relative = os.path.relpath(ckpt, os.getcwd())
    for gguf_path in (ckpt, link_file, relative, link_dir / "ckpt.pt"):
        cases.refused(gguf_export.main, [f"--out_dir={tiny_ckpt}", f"--gguf={gguf_path}"], ["--gguf"])
    cases.refused(gguf_export.main, [f"--out_dir={tiny_ckpt}", f"--gguf={existing / 'model.gguf'}"], ["--overwrite"])
    cases.refused(gguf_export.main, [f"--out_dir={tiny_ckpt}", f"--gguf={existing / 'a_folder.gguf'}"], ["--gguf"])
    cases.refused(gguf_export.main, ["import", f"--gguf={existing / 'model.gguf'}", f"--out_dir={existing}"],
                  ["--overwrite"])
    # import onto its own source: out_dir/ckpt.pt is the GGUF read (through a link)
    onto = tmp_path / "onto"
    os.makedirs(onto)
    os.symlink(existing / "model.gguf", onto / "ckpt.pt")
    cases.refused(gguf_export.main, ["import", f"--gguf={existing / 'model.gguf'}", f"--out_dir={onto}", "--overwrite"],
                  ["--out_dir"])
    spin = ["--device=cpu", "--steps=1", "--nsamples=2", "--eval_tokens=100"]
    for quantized_dir in (link_dir, tiny_ckpt, os.path.relpath(tiny_ckpt, os.getcwd())):
        cases.refused(spinquant_ptq.main, [f"--out_dir={tiny_ckpt}", f"--quantized_dir={quantized_dir}", *spin],
                      ["--quantized_dir"])
    cases.refused(spinquant_ptq.main, [f"--out_dir={tiny_ckpt}", f"--quantized_dir={existing}", *spin],
                  ["--overwrite"])
    cases.refused(spinquant_ptq.main, [f"--out_dir={link_dir}", f"--quantized_dir={tiny_ckpt}", *spin],
                  ["--quantized_dir"])
    for flag in ("--lr=nan", "--lr=inf", "--lr=-1", "--lr=0"):
        cases.refused(spinquant_ptq.main, [f"--out_dir={tiny_ckpt}", f"--quantized_dir={tmp_path / 'q'}", *spin, flag],
                      ["--lr"], absent=[tmp_path / "q"])
    assert snapshot(str(existing)) == watch
    cases.check()


def test_every_float_flag_refuses_nan_and_inf(tiny_ckpt, tmp_path, capsys):
    """Every float flag of every tool is parsed by safety.finite_float."""
    import argparse
    from safety import finite_float
    assert finite_float("1e-3") == 1e-3
    for text in ("nan", "inf", "-inf", "1e400", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            finite_float(text)
    cases = Cases(capsys, tiny_ckpt)
    ck = f"--out_dir={tiny_ckpt}"
    tools = [(sample.main, [ck, "--device=cpu"], ["--temperature"]),
             (autoround_ptq.main, [ck, f"--quantized_dir={tmp_path / 'q'}", "--device=cpu"],
              ["--lr", "--damp_percent", "--outlier_fraction"]),
             (spinquant_ptq.main, [ck, f"--quantized_dir={tmp_path / 'q'}", "--device=cpu"], ["--lr"]),
             (load_demo("spinquant_sample").main, [ck, "--device=cpu"], ["--temperature"])]
    for main, base, flags in tools:
        for flag in flags:
            for value in ("nan", "inf", "-inf"):
                cases.refused(main, [*base, f"{flag}={value}"], [flag], absent=[tmp_path / "q"])
    cases.check()


# ---------------------------------------------------------------------------------------------------------------
# GGUF files whose metadata contradict their tensors, read by gguf_export.py import and train.py --init_from

# A vocabulary of GGUF_VOCAB tokens (GPT-2's first 63 and its end of text) stands for GPT-2's 50257 in these files:
# gguf's reader parses a token list string by string (about 1.3 s for GPT-2's), and every check of read_gguf after
# the vocabulary's takes the file's token count as its vocab_size. The importer compares the list with
# gpt2_vocab()[:GPT2_EOT + 1], so the test points both at the short vocabulary (small_gpt2_vocab); the real one is
# read, imported and fine-tuned from in test_gguf.py.
GGUF_VOCAB = 64
GGUF_ARGS = dict(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=GGUF_VOCAB, bias=True)


@pytest.fixture
def small_gpt2_vocab(monkeypatch):
    """gguf_export's idea of GPT-2's vocabulary shortened to GGUF_VOCAB tokens: the first GGUF_VOCAB - 1 and the end
    of text (token GGUF_VOCAB - 1), in the writer of write_gguf and the reader of the importer and of train.py."""
    tokens, types, merges = gguf_export.gpt2_vocab()
    short = (tokens[:GGUF_VOCAB - 1] + tokens[-1:], types[:GGUF_VOCAB - 1] + types[-1:], ())
    monkeypatch.setattr(gguf_export, "gpt2_vocab", lambda: short)
    monkeypatch.setattr(gguf_export, "GPT2_EOT", GGUF_VOCAB - 1)
    return short


def gguf_parts():
    """(metadata {gpt2.<key>: value}, [(tensor name, array)]) of a tiny GPT in llama.cpp's gpt2 layout."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GGUF_ARGS))
    weights = {k: gguf_export.Weight(v.float()) for k, v in model.state_dict().items()}
    tensors = [(name, w.value.numpy().astype(np.float32)) for name, w in gguf_export.gguf_tensors(model, weights)]
    fields = {"block_count": 1, "attention.head_count": 2, "embedding_length": 8, "context_length": 16,
              "feed_forward_length": 32}
    return fields, tensors


def write_gguf(path, fields, tensors):
    import gguf
    writer = gguf.GGUFWriter(str(path), "gpt2")
    for key, value in fields.items():
        if isinstance(value, str):
            writer.add_string(f"gpt2.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"gpt2.{key}", value)
        else:
            writer.add_uint32(f"gpt2.{key}", value)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(list(gguf_export.gpt2_vocab()[0]))
    for name, array in tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def damaged_ggufs():
    """{name: (metadata, tensors)}: metadata that contradict the tensors, and tensors that contradict the metadata."""
    def field(**changes):
        def make(fields, tensors):
            fields = dict(fields)
            for key, value in changes.items():
                key = key.replace("__", ".")
                if value is None:
                    fields.pop(key)
                else:
                    fields[key] = value
            return fields, tensors
        return make

    def tensor(name, array=None, drop=False):
        def make(fields, tensors):
            out = [(n, a) for n, a in tensors if not (drop and n == name)]
            if not drop:
                out = [(n, array if n == name else a) for n, a in out]
                if name not in dict(out):
                    out.append((name, array))
            return fields, out
        return make

    return {
        "block_count_2": field(block_count=2), "block_count_0": field(block_count=0),
        "block_count_huge": field(block_count=2 ** 31 - 1), "block_count_str": field(block_count="1"),
        "block_count_float": field(block_count=1.0), "no_block_count": field(block_count=None),
        "head_count_3": field(attention__head_count=3), "head_count_0": field(attention__head_count=0),
        "no_head_count": field(attention__head_count=None), "context_32": field(context_length=32),
        "context_8": field(context_length=8), "embedding_16": field(embedding_length=16),
        "ffn_16": field(feed_forward_length=16),
        "ffn_up_wrong": tensor("blk.0.ffn_up.weight", np.ones((16, 8), np.float32)),
        "qkv_wrong": tensor("blk.0.attn_qkv.weight", np.ones((8, 8), np.float32)),
        "bias_wrong": tensor("output_norm.bias", np.ones(9, np.float32)),
        "token_embd_wrong": tensor("token_embd.weight", np.ones((GGUF_VOCAB + 36, 8), np.float32)),
        "missing_qkv_bias": tensor("blk.0.attn_qkv.bias", drop=True),
        "missing_position": tensor("position_embd.weight", drop=True),
        "extra_block": tensor("blk.1.ffn_norm.weight", np.ones(8, np.float32)),
        "stray_tensor": tensor("rope_freqs.weight", np.ones(8, np.float32)),
        "nan_weight": tensor("blk.0.ffn_down.weight", np.full((8, 32), np.nan, np.float32)),
        "inf_bias": tensor("blk.0.ffn_up.bias", np.full(32, np.inf, np.float32)),
        "head_apart": tensor("output.weight", np.ones((GGUF_VOCAB, 8), np.float32)),
    }


def test_damaged_gguf_files_are_refused_by_name(bpe_data, small_gpt2_vocab, tmp_path, capsys):
    fields, tensors = gguf_parts()
    good = tmp_path / "good.gguf"
    write_gguf(good, fields, tensors)
    assert run_main(gguf_export.main, "import", f"--gguf={good}", f"--out_dir={tmp_path / 'good_imp'}") is None
    # the short vocabulary passed the importer's check: the damaged files below reach the checks after it
    assert load_checkpoint(str(tmp_path / "good_imp"))["model_args"]["vocab_size"] == GGUF_VOCAB
    files = []
    for name, damage in damaged_ggufs().items():
        path = tmp_path / f"{name}.gguf"
        write_gguf(path, *damage(fields, tensors))
        files.append(path)
    (tmp_path / "truncated.gguf").write_bytes(good.read_bytes()[:-100])
    (tmp_path / "header_only.gguf").write_bytes(good.read_bytes()[:24])
    files += [tmp_path / "truncated.gguf", tmp_path / "header_only.gguf"]
    cases = Cases(capsys)
    imp, ft = tmp_path / "imp", tmp_path / "ft"
    # every file through the importer; train.py reads a GGUF with the same read_gguf, so it is given one file of
    # each kind of damage
    through_train = {"block_count_2", "ffn_up_wrong", "missing_position", "nan_weight", "truncated"}
    for path in files:
        cases.refused(gguf_export.main, ["import", f"--gguf={path}", f"--out_dir={imp}"], [str(path)], absent=[imp])
        if path.stem in through_train:
            cases.refused(train_script.main, [f"--out_dir={ft}", "--dataset=shakespeare", f"--init_from={path}",
                                              "--device=cpu", "--max_iters=1", "--eval_iters=1", "--batch_size=2",
                                              "--block_size=16"], [str(path)], absent=[ft])
            through_train.remove(path.stem)
    assert not through_train, through_train  # each name is one of the damaged files
    cases.check()


# ---------------------------------------------------------------------------------------------------------------
# packed checkpoints whose codes, scales, zero points or outliers contradict their spec and shape

@pytest.fixture(scope="module")
def packed_ckpt(tiny_ckpt, tmp_path_factory):
    """tiny_ckpt quantized by round-to-nearest (affine 4-bit, groups of 16, 2% outliers) and packed: its out_dir."""
    from inference import load_model
    from quantization.packing import packed_checkpoint
    from quantization.rtn import rtn_quantize, weight_spec
    model, _ = load_model(tiny_ckpt, "cpu")
    records = rtn_quantize(model, weight_spec(4, 16, outlier_fraction=0.02))
    out = tmp_path_factory.mktemp("packed")
    save_checkpoint(str(out / "ckpt.pt"), packed_checkpoint(load_checkpoint(tiny_ckpt), model, records, {"method": "rtn"}))
    return str(out)


def damaged_packed():
    """{name: a function that damages one packed layer (a dict) in place}."""
    def put(key, value):
        return lambda p: p.update({key: value(p) if callable(value) else value})

    def spec(**changes):
        return lambda p: p["spec"].update(changes)

    def outliers(key, value):
        return lambda p: p["outliers"].update({key: value(p["outliers"])})

    return {
        "codes_truncated": put("codes", lambda p: p["codes"][:-7]), "codes_empty": put("codes", lambda p: p["codes"][:0]),
        "codes_extra": put("codes", lambda p: torch.cat([p["codes"], p["codes"][:5]])),
        "codes_float": put("codes", lambda p: p["codes"].float()), "codes_2d": put("codes", lambda p: p["codes"][None]),
        "codes_not_tensor": put("codes", [1, 2, 3]),
        "scale_nan": put("scale", lambda p: p["scale"].index_fill(0, torch.tensor([0]), float("nan"))),
        "scale_inf": put("scale", lambda p: p["scale"].index_fill(0, torch.tensor([1]), float("inf"))),
        "scale_short": put("scale", lambda p: p["scale"][:-1]), "scale_int": put("scale", lambda p: p["scale"].long()),
        "zero_point_float": put("zero_point", lambda p: p["zero_point"].float()),
        "zero_point_range": put("zero_point", lambda p: torch.full_like(p["zero_point"], 99)),
        "zero_point_short": put("zero_point", lambda p: p["zero_point"][:3]),
        "no_scale": lambda p: p.pop("scale"), "spec_bits_40": spec(bits=40), "spec_bits_2": spec(bits=2),
        "spec_unknown": spec(fancy=1), "spec_group_5": spec(group_size=5), "spec_method": spec(method="magic"),
        "spec_not_dict": put("spec", "affine"), "spec_per_tensor": spec(granularity="per_tensor"),
        "outlier_inf": outliers("values", lambda o: o["values"].index_fill(0, torch.tensor([0]), float("inf"))),
        "outlier_nan": outliers("values", lambda o: o["values"].index_fill(0, torch.tensor([0]), float("nan"))),
        "outlier_col": outliers("col", lambda o: o["col"].index_fill(0, torch.tensor([0]), 9999)),
        "outlier_crow": outliers("crow", lambda o: o["crow"][:-1]),
        "outlier_values_short": outliers("values", lambda o: o["values"][:-1]),
        "outliers_list": put("outliers", [1]),
    }


def test_damaged_packed_checkpoints_are_refused_by_every_reader(tiny_ckpt, packed_ckpt, tmp_path, capsys):
    from quantization.packing import load_packed
    good = torch.load(os.path.join(packed_ckpt, "ckpt.pt"), weights_only=True)
    layer = next(iter(good["packed_weights"]))
    assert "outliers" in good["packed_weights"][layer]
    cases = Cases(capsys, tiny_ckpt, packed_ckpt)
    assert run_main(sample.main, f"--out_dir={packed_ckpt}", "--device=cpu", "--max_new_tokens=2") is None
    for name, damage in damaged_packed().items():
        ckpt = torch.load(os.path.join(packed_ckpt, "ckpt.pt"), weights_only=True)
        damage(ckpt["packed_weights"][layer])
        folder = tmp_path / name
        save_checkpoint(str(folder / "ckpt.pt"), ckpt)
        for main, argv in [
            (sample.main, [f"--out_dir={folder}", "--device=cpu", "--max_new_tokens=2"]),
            (perplexity.main, [f"--out_dir={folder}", "--device=cpu", "--max_tokens=100", "--progress=False"]),
            (perplexity.main, [f"--out_dir={tiny_ckpt}", f"--quantized_dir={folder}", "--device=cpu",
                               "--max_tokens=100", "--progress=False"]),
            (gguf_export.main, [f"--out_dir={folder}", f"--gguf={tmp_path / 'x.gguf'}"]),
            (save_weights.main, [f"--out_dir={folder}", f"--file_name={tmp_path / 'w'}"]),
            (hf.main, ["export", f"--out_dir={folder}", f"--hf={tmp_path / 'hf'}"]),
        ]:
            cases.refused(main, argv, [str(folder)], absent=[tmp_path / "x.gguf", tmp_path / "w.pkl", tmp_path / "hf"])
        # the loader itself, for every other caller: one ValueError naming the layer
        with pytest.raises(ValueError, match=layer):
            from model import GPT, GPTConfig
            load_packed(GPT(GPTConfig(**ckpt["model_args"])), ckpt)
    cases.check()


def test_refused_hf_weights_are_one_line(tmp_path, capsys):
    cases = Cases(capsys)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    configs = {"code": {"n_layer": 1, "n_head": 1, "n_embd": 8, "vocab_size": 50257},
               "bad_config": "{not json", "no_n_embd": {"n_layer": 1, "n_head": 1, "vocab_size": 50257},
               "n_layer_str": {"n_layer": "1", "n_head": 1, "n_embd": 8, "vocab_size": 50257}}
    for name, config in configs.items():
        folder = tmp_path / name
        os.makedirs(folder)
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        torch.save({"wte.weight": Payload()} if name == "code" else {"wte.weight": torch.ones(2)},
                   folder / "pytorch_model.bin")
        cases.refused(hf.main, ["import", f"--hf={folder}", f"--out_dir={tmp_path / 'o'}"], [str(folder)],
                      absent=[tmp_path / "o"])
    assert not (tmp_path / "ran").exists()
    cases.check()


def test_perplexity_refuses_checkpoints_of_two_tokenizers(tiny_ckpt, tmp_path, capsys):
    from model import GPT, GPTConfig
    bpe_meta = os.path.join(ROOT, "data", "shakespeare", "meta.json")
    if not os.path.exists(bpe_meta):
        pytest.skip("data/shakespeare is not prepared")
    args = dict(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=50257)
    save_checkpoint(str(tmp_path / "bpe" / "ckpt.pt"), {"model": GPT(GPTConfig(**args)).state_dict(),
                                                          "model_args": args, "dataset": "shakespeare"})
    cases = Cases(capsys)
    for a, b in ((tiny_ckpt, tmp_path / "bpe"), (tmp_path / "bpe", tiny_ckpt)):
        cases.refused(perplexity.main, [f"--out_dir={a}", f"--quantized_dir={b}", "--device=cpu", "--max_tokens=50",
                                        "--progress=False"], ["--quantized_dir"])
    cases.check()


def test_resume_keeps_its_dataset_and_architecture(tiny_ckpt, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_ckpt, run)
    cases = Cases(capsys, str(run))
    for flag in ("--dataset=shakespeare", "--block_size=16", "--n_layer=3", "--bias=True",
                 "--linear_variant_mlp=quantized_linear", "--quantize_attn_act"):
        cases.refused(train_script.main, [f"--out_dir={run}", "--init_from=resume", "--device=cpu", flag],
                      [flag.split("=")[0]])
    cases.check()
    # flags left out come from the checkpoint: no --block_size needed
    assert run_main(train_script.main, f"--out_dir={run}", "--init_from=resume", "--device=cpu", "--max_iters=3",
                    "--eval_interval=3", "--eval_iters=1", "--log_interval=1") is None
    assert load_checkpoint(str(run))["iter_num"] == 3


def test_a_loss_that_becomes_nan_stops_with_its_iteration_and_saves_nothing(char_data, tmp_path):
    error = run_main(train_script.main, f"--out_dir={tmp_path}", *TINY, "--max_iters=20", "--eval_interval=20",
                     "--learning_rate=1e30", "--grad_clip=0", "--decay_lr=False")
    assert error is not None and "iter " in error and "not finite" in error and "\n" not in error
    assert not os.path.exists(tmp_path / "ckpt.pt")


def test_stale_temp_files_are_cleaned_and_fresh_ones_kept(tmp_path):
    stale, fresh = tmp_path / ".ckpt-old.tmp", tmp_path / ".ckpt-new.tmp"
    stale.write_bytes(b"")
    fresh.write_bytes(b"")
    os.utime(stale, (0, 0))
    save_checkpoint(str(tmp_path / "ckpt.pt"), {"model": {}, "model_args": {}})
    assert not stale.exists() and fresh.exists()


def test_temperature_zero_is_greedy(tiny_ckpt, capsys):
    def draw(seed):
        assert run_main(sample.main, f"--out_dir={tiny_ckpt}", "--temperature=0", f"--seed={seed}", "--num_samples=1",
                        "--max_new_tokens=20", "--device=cpu", "--top_k=None") is None
        return capsys.readouterr().out
    assert draw(1) == draw(2)


def test_max_tokens_reads_only_what_it_needs(tmp_path):
    from tokenizer import Tokenizer, load_meta
    enc = Tokenizer(load_meta(os.path.join(ROOT, "data", "shakespeare_char")))
    text = "To be, or not to be, that is the question.\n" * 2000
    path = tmp_path / "t.txt"
    path.write_text(text)
    assert perplexity.text_tokens(str(path), enc, 100).tolist() == enc.encode(text)[:100]
    assert perplexity.text_tokens(str(path), enc).tolist() == enc.encode(text)


# ---------------------------------------------------------------------------------------------------------------
# end to end, in a fresh interpreter: exactly one line on stderr, no traceback

@pytest.mark.parametrize("script,flags,named", [
    ("train.py", ["--eval_iters=0"], "--eval_iters"),
    ("sample.py", ["--device=cuda"] if not torch.cuda.is_available() else ["--top_k=0"], "--"),
    ("quantization/visualize.py", ["--file_name=/no/such.pkl"], "--file_name"),
])
def test_cli_errors_are_one_line(script, flags, named):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and named in lines[0] and "Traceback" not in result.stderr


def test_wandb_without_a_key_logs_offline(char_data, tmp_path):
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={tmp_path / 'o'}",
                             "--n_layer=1", "--n_head=1", "--n_embd=8", "--block_size=8", "--batch_size=2",
                             "--eval_iters=1", "--max_iters=1", "--eval_interval=1", "--device=cpu", "--wandb_log"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "logging offline" in result.stdout
    assert os.path.isdir(tmp_path / "wandb")


def test_report_tables_never_replace_sources_or_earlier_results(tiny_ckpt, tmp_path, capsys):
    """The demos that write a table or JSON rows (smoothquant_w8a8, qat_outliers_table, ptq_compare,
    spinquant_compare, compare_methods, residual_binary, gguf_llamacpp) keep the rule of every tool: never onto an
    input (through a symlink too), never over an earlier result without --overwrite; refused before any work,
    nothing written."""
    cases = Cases(capsys, tiny_ckpt)
    ckpt = os.path.join(tiny_ckpt, "ckpt.pt")
    link = tmp_path / "link.json"
    os.symlink(ckpt, link)
    earlier = tmp_path / "earlier"
    os.makedirs(earlier)
    for name in ("rows.json", "weights.md", "table.md"):
        (earlier / name).write_text("earlier work")
    watch = snapshot(str(earlier))
    for demo, argv in (("smoothquant_w8a8", [f"--out_dir={tiny_ckpt}", "--device=cpu"]),
                       ("qat_outliers_table", [f"--runs={tiny_ckpt}", "--device=cpu"]),
                       ("ptq_compare", [f"--out_dir={tiny_ckpt}", "--device=cpu"]),
                       ("spinquant_compare", [f"--out_dir={tiny_ckpt}", "--device=cpu"])):
        main = load_demo(demo).main
        cases.refused(main, [*argv, f"--json={link}"], ["--json"])
        cases.refused(main, [*argv, f"--json={earlier / 'rows.json'}"], ["--overwrite"])
    cases.refused(load_demo("residual_binary").main, [f"--json={earlier / 'rows.json'}", f"--out_root={tmp_path / 'rb'}"],
                  ["--overwrite"], absent=[tmp_path / "rb"])
    cases.refused(load_demo("compare_methods").main, [f"--out_root={earlier}", "--suite=weights"], ["--overwrite"],
                  absent=[earlier / "full_precision"])
    cases.refused(load_demo("gguf_llamacpp").main, [f"--work={tmp_path / 'w'}", f"--results={earlier / 'table.md'}"],
                  ["--overwrite"], absent=[tmp_path / "w"])
    assert snapshot(str(earlier)) == watch
    cases.check()


def test_benchmark_tables_never_replace_a_checkpoint(tiny_ckpt, capsys):
    """A benchmark's table or JSON (--out of bench/decode.py and bench/kernels.py, --json of
    bench/spinquant_clipping.py) replaces an earlier table, by design, but never a file that is not text: pointed at a
    checkpoint it is refused in one line naming the flag, before anything runs, and the checkpoint is untouched."""
    def load_bench(name):
        return load_script(f"bench/{name}.py")

    cases = Cases(capsys, tiny_ckpt)
    ckpt = os.path.join(tiny_ckpt, "ckpt.pt")
    cases.refused(load_bench("decode").main, ["--shapes=tiny", "--device=cpu", f"--out={ckpt}"], ["--out"])
    cases.refused(load_bench("spinquant_clipping").main, [f"--out_dir={tiny_ckpt}", "--device=cpu", f"--json={ckpt}"],
                  ["--json"])
    cases.refused(load_bench("kernels").main, [f"--out={ckpt}"], ["--out"])
    cases.check()
