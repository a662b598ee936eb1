"""QAT with SpinQuant's rotations (train.py --spinquant): at the switch to quantized training, learn R1/R2 of the
QAT model with its own weight and activation quantizers (quantization/spin_quant.py's SpinQuant, weights frozen),
keep them only when they clearly beat no rotation on held-out training sequences, and return the model QAT goes on
with: a RotatedQAT that trains the model's own parameters in their original basis (the default), or a model with
R1-R4 baked into new latent weights (QAT_BASIS "rotated").

    model, model_args, info = rotate_for_qat(model, model_args, batches, steps=100)

The module settings below (QAT_*) are what the bench scripts compare (docs/spinquant.md):

    python -c "import quantization.spin_quant_qat as s; s.QAT_SELECT = False; import train; train.main([...])"
"""
import torch
import torch.nn as nn
from torch.func import functional_call

import quantization.spin_quant as spin_quant
from model import GPT, GPTConfig
from quantization.fold import build_like, fold_state
from quantization.hadamard import hadamard_matrix
from quantization.quantizers import QuantSpec, fake_quant
from quantization.spin_quant import FULL_BITS, SpinQuant, check_plain, paired_gain, rotate_state


def check_qat(model_args):
    """ValueError (naming the flag) when train.py --spinquant cannot rotate a model of these model_args."""
    if model_args.get("embedding_quant"):
        raise ValueError("--spinquant: a quantized embedding cannot be rotated (the head is untied from it); "
                         "drop --quantize_embedding")
    C, H = model_args["n_embd"], model_args["n_head"]
    for flag, width in (("n_embd", C), ("n_embd", 4 * C), ("n_head", C // H)):
        try:
            hadamard_matrix(width)
        except ValueError as e:
            raise ValueError(f"--spinquant with --{flag}={model_args[flag]}: {e}") from None


# QAT after the rotation (train.py --spinquant); module settings so that bench scripts can compare the choices
# measured on the default model (docs/spinquant.md): a fresh AdamW at the scheduled lr did best; carrying the
# moments or warming the lr up again ended worse, so both are off
QAT_CARRY_MOMENTS = False  # AdamW's moments carried into the rotated basis (else: a fresh optimizer)
QAT_REWARM = False         # warm the learning rate up again after the switch, over warmup_iters
QAT_DECAY_FOLDED = True    # weight decay on the matrices that absorbed LayerNorm gains (q, k, v, mlp_up, head)
# where QAT's weights train after the switch: "original" (their own basis, the rotations applied in the forward pass:
# RotatedQAT) or "rotated" (R1-R4 baked into new latent weights; the three settings above apply to it alone)
QAT_BASIS = "original"
# R1 and R2 trained on with the weights after the switch (QAT_BASIS "original"), as orthogonal parametrizations
# (torch.nn.utils.parametrizations.orthogonal: base @ matrix_exp(A), A skew-symmetric, starting at 0) in a
# parameter group of their own, without weight decay, at this multiple of the run's learning rate; 0: fixed
QAT_LEARN_ROTATIONS = 0.0
# rotate_for_qat's default: keep the rotations only when they clearly beat no rotation (False: always keep them, as
# the benches do to measure the rotated QAT itself)
QAT_SELECT = True
NORM_READERS = {"attn.q": "ln_1", "attn.k": "ln_1", "attn.v": "ln_1", "mlp.mlp_up": "ln_2"}


def _plain_name(name):
    return name.replace(".parametrizations.weight.original", ".weight")


def _reader_gain(key, old_params):
    """The LayerNorm gain folded into the input columns of weight `key` (None when it reads no norm)."""
    if key == "lm_head.weight":
        return old_params.get("transformer.ln_f.weight")
    for site, norm in NORM_READERS.items():
        if key.endswith(f".{site}.weight"):
            return old_params.get(key[:-len(f"{site}.weight")] + f"{norm}.weight")
    return None


@torch.no_grad()
def qat_optimizer(old_model, old_optimizer, new_model, sq, weight_decay, learning_rate, betas, device_type):
    """AdamW for the rotated QAT model. With QAT_CARRY_MOMENTS its state continues the old optimizer's: the step
    count, the first moment mapped as a gradient is (divided by the folded LayerNorm gain on the input columns, then
    rotated by R1-R4 exactly as the weights), and the second moment, which no rotation carries per coordinate, as
    its mean over the tensor (divided by the squared gain). With QAT_DECAY_FOLDED off, the matrices that absorbed
    LayerNorm gains are left out of weight decay (decay of W diag(g) R equals decay of W with g undecayed, so it
    is on by default)."""
    named = {_plain_name(n): p for n, p in new_model.named_parameters() if p.requires_grad}
    undecayed = set() if QAT_DECAY_FOLDED else {
        n for n in named if n == "lm_head.weight" or any(n.endswith(f".{site}.weight") for site in NORM_READERS)}
    groups = [{"params": [p for n, p in named.items() if p.dim() >= 2 and n not in undecayed],
               "weight_decay": weight_decay},
              {"params": [p for n, p in named.items() if p.dim() < 2 or n in undecayed], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")
    if not QAT_CARRY_MOMENTS or old_optimizer is None:
        return optimizer
    old = {_plain_name(n): p for n, p in old_model.named_parameters()}
    first, second, steps = {}, {}, {}
    for key, p in named.items():
        source = old.get(key, old.get("transformer.wte.weight") if key == "lm_head.weight" else None)
        state = old_optimizer.state.get(source) if source is not None else None
        if not state or "exp_avg" not in state:
            first[key], second[key] = torch.zeros_like(p), None
            continue
        m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
        gain = _reader_gain(key, old)
        if gain is not None:
            m, v = m / gain.double(), v / gain.double() ** 2
        first[key], second[key], steps[key] = m, v.mean(), state["step"]
    cfg, dev = new_model.config, next(iter(first.values())).device
    hd = cfg.n_embd // cfg.n_head
    rotated = rotate_state(first, cfg, R1=None if sq.R1 is None else sq.R1.detach().to(dev, torch.float64),
                           R2=None if sq.R2 is None else [R.detach().to(dev, torch.float64) for R in sq.R2],
                           R3=hadamard_matrix(hd).to(dev) if "R3" in sq.rotations else None,
                           R4=hadamard_matrix(4 * cfg.n_embd).t().to(dev) if "R4" in sq.rotations else None)
    for key, p in named.items():
        if second.get(key) is None:
            continue
        optimizer.state[p] = {"step": steps[key].clone(), "exp_avg": rotated[key].to(p.dtype).reshape(p.shape),
                              "exp_avg_sq": torch.full_like(p, second[key].item())}
    return optimizer


def qat_lr(lr, it, switch_iter, warmup_iters):
    """The learning rate after the rotation: with QAT_REWARM, warmed up linearly again from the switch."""
    if not QAT_REWARM or it < switch_iter:
        return lr
    return lr * min(1.0, (it - switch_iter + 1) / (warmup_iters + 1))


def learn_qat_rotations(model, model_args, batches, steps=100, lr=1.5, seed=0, progress=False, heldout=None):
    """The SpinQuant of a QAT model (train.py --spinquant): its weights folded, R1/R2 learned with the QAT run's own
    weight and activation quantizers (weights frozen; the best held-out step kept). `batches`: (N, T + 1) tokens;
    `heldout`: more of them, never learned on (None: a quarter of `batches`)."""
    check_plain({**model_args, "linear_variants": {}, "act_quant": {}, "embedding_quant": None}, "the QAT model")
    check_qat(model_args)
    plain_args = {**model_args, "linear_variants": {}, "weight_quant": {}, "act_quant": {}}
    device = next(model.parameters()).device
    state = {_plain_name(k): v.detach().float() for k, v in model.state_dict().items()}
    plain = build_like(GPTConfig(**plain_args), state)
    specs = {site: QuantSpec(**fields) for site, fields in model_args.get("weight_quant", {}).items()}
    sq = SpinQuant(plain, bits=FULL_BITS, act_quant=model_args.get("act_quant", {}), weight_specs=specs, seed=seed,
                   device=device)
    sq.optimize(batches, steps=steps, lr=lr, seed=seed, progress=progress, heldout=heldout)
    return sq


def qat_model_state(config, state):
    """`state` (plain `.weight` keys) renamed for a GPT of `config`, whose quantized sites keep their latent weight
    under `parametrizations.weight.original`."""
    with torch.device("meta"):  # the names alone: no memory, no random draws
        names = set(GPT(config).state_dict())
    out = dict(state)
    for key in list(out):
        latent = key[:-len("weight")] + "parametrizations.weight.original"
        if key not in names and latent in names:
            out[latent] = out.pop(key)
    return out


class RotatedQAT(nn.Module):
    """train.py --spinquant after the switch (QAT_BASIS "original"): the optimizer keeps training the QAT model's own
    parameters (`base`: LayerNorms, tied head, the original basis, with the AdamW state they had), while the forward
    pass computes the folded, rotated model from them (fold_state, rotate_state: plain tensor operations, so the
    gradients reach the original weights), quantizes the rotated weights with the run's weight quantizers, and runs
    them through a GPT with the run's activation quantizers and R4's online Hadamard. With the quantizers off it
    computes `base`'s logits. `checkpoint_state` bakes it into an ordinary rotated QAT checkpoint."""

    def __init__(self, base, base_args, R1, R2, learn=None):
        super().__init__()
        cfg = base.config
        C, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
        device = next(base.parameters()).device
        self.base, self.base_args = base, dict(base_args)
        self.rotated_args = {**base_args, "norm": "rmsnorm", "tied_head": False,
                             "online_transforms": {"mlp_activation_output": "hadamard"}}
        plain = GPTConfig(**{**self.rotated_args, "linear_variants": {}, "weight_quant": {}})
        with torch.random.fork_rng(devices=[]):
            self.rotated = GPT(plain).to(device)
        self.rotated.requires_grad_(False)
        self.rotated.set_quantization(base.quantization_enabled)
        self.rotated.train(base.training)
        self.specs = {site: QuantSpec(**fields) for site, fields in base_args.get("weight_quant", {}).items()
                      if base_args.get("linear_variants", {}).get(site) == "quantized_linear"}
        R1 = R1.detach().to(device, torch.float32).clone()
        R2 = torch.stack([R.detach() for R in R2]).to(device, torch.float32)
        self.learn_rotations = QAT_LEARN_ROTATIONS if learn is None else learn
        if self.learn_rotations:  # trained on with the weights (QAT_LEARN_ROTATIONS), kept orthogonal
            self.R1, self.R2 = nn.Parameter(R1), nn.Parameter(R2)
            nn.utils.parametrizations.orthogonal(self, "R1")
            nn.utils.parametrizations.orthogonal(self, "R2")
        else:
            self.register_buffer("R1", R1)
            self.register_buffer("R2", R2)
        self.register_buffer("R3", hadamard_matrix(hd, torch.float32).to(device))
        self.register_buffer("R4", hadamard_matrix(4 * C, torch.float32).t().contiguous().to(device))
        self.config = plain

    @property
    def quantization_enabled(self):
        return self.base.quantization_enabled

    @property
    def embedding_spec(self):
        return self.base.embedding_spec

    def get_num_params(self, non_embedding=True):
        return self.base.get_num_params(non_embedding)

    def set_quantization(self, enabled):
        self.base.set_quantization(enabled)
        self.rotated.set_quantization(enabled)

    def rotated_state(self, quantize=True):
        """The rotated model's weights, computed from base's parameters (in float32 at least, outside autocast)."""
        dtype = torch.promote_types(self.R1.dtype, torch.float32)  # float32, or float64 after .double()
        with torch.autocast(self.R1.device.type, enabled=False):
            state = {_plain_name(k): v.to(dtype) for k, v in self.base.named_parameters()}
            state = rotate_state(fold_state(state, self.base.config), self.base.config, R1=self.R1,
                                 R2=list(self.R2.unbind(0)), R3=self.R3, R4=self.R4)
            if quantize and self.base.quantization_enabled:
                for key in state:
                    spec = self.specs.get(key.split(".")[-2]) if key.endswith(".weight") else None
                    if spec is not None:
                        state[key] = fake_quant(state[key], spec, self.training)
        return state

    def forward(self, idx, targets=None):
        return functional_call(self.rotated, self.rotated_state(), (idx, targets))

    @torch.no_grad()
    def checkpoint_state(self):
        """(model_args, state dict) of the baked rotated QAT model: what sample.py, perplexity and packing load."""
        state = {k: v.detach().clone() for k, v in self.rotated_state(quantize=False).items()}
        return self.rotated_args, qat_model_state(GPTConfig(**self.rotated_args), state)

    def rotation_group(self):
        """The optimizer's parameter group for learned rotations (train.py scales its lr by lr_scale), or None."""
        if not self.learn_rotations:
            return None
        return {"params": [self.parametrizations.R1.original, self.parametrizations.R2.original],
                "weight_decay": 0.0, "lr_scale": float(self.learn_rotations)}

    def resume_state(self):
        """What a resumed run needs to rebuild this model: base's model_args and weights, R1 and R2 (as they are
        now), and whether they are learned."""
        saved = {"model_args": self.base_args, "model": self.base.state_dict(), "R1": self.R1.detach().clone(),
                 "R2": self.R2.detach().clone(), "learn_rotations": float(self.learn_rotations)}
        if self.learn_rotations:  # the parametrizations' own tensors: the optimizer's state refers to them
            saved["parametrizations"] = self.parametrizations.state_dict()
        return saved

    @classmethod
    def from_resume_state(cls, saved):
        base = GPT(GPTConfig(**saved["model_args"]))
        base.load_state_dict(saved["model"])
        model = cls(base, saved["model_args"], saved["R1"], list(saved["R2"].unbind(0)),
                    learn=saved.get("learn_rotations", 0.0))
        if "parametrizations" in saved:
            model.parametrizations.load_state_dict(saved["parametrizations"])
        return model


def rotate_for_qat(model, model_args, batches, steps=100, lr=1.5, seed=0, progress=False, optimizer=None,
                   optimizer_args=None, select=None, heldout=None):
    """QAT's rotations (train.py --spinquant): learn R1/R2 of a QAT model with its own weight and activation
    quantizers (weights frozen) and return (the model QAT goes on with, its model_args, info).
    Both are scored on held-out training sequences (the quantized model as it is and as QAT would train it rotated,
    per sequence); with `select` (None: QAT_SELECT) the rotations are kept only when they are
    `spin_quant.CLEAR_Z` standard errors better (SpinQuant.choose's bar for one candidate), else `model` and
    `model_args` come back unchanged. info: {"kept": "rotations" or "no rotation", "losses": the learning losses,
    "none", "rotated": the held-out losses, "z"}.
    With QAT_BASIS "original" the rotated model is a RotatedQAT that trains `model`'s own parameters; with
    "rotated", R1-R4 are baked in and the new model's latent weights are the rotated ones, so training continues in
    the rotated basis. `batches`: (N, T + 1) training tokens; `heldout`: more, never learned on (None: a quarter of
    `batches`), half to pick the best step, half for the choice. With `optimizer` (and optimizer_args: weight_decay,
    learning_rate, betas, device_type), also returns the optimizer that trains the returned model as a fourth item:
    the same one for "original" and for no rotation, qat_optimizer's for "rotated"."""
    if QAT_BASIS not in ("original", "rotated"):
        raise ValueError(f"QAT_BASIS={QAT_BASIS!r}: expected original or rotated")
    sq = learn_qat_rotations(model, model_args, batches, steps, lr, seed, progress, heldout)
    info = {"kept": "rotations", "losses": sq.losses}
    wrapped = RotatedQAT(model, model_args, sq.R1, sq.R2)
    if sq.heldout is not None:
        training = model.training
        wrapped.eval()  # base (model) too
        none, rotated = sq.sample_losses(sq.heldout, model), sq.sample_losses(sq.heldout, wrapped)
        wrapped.train(training)
        gain, z = paired_gain(none, rotated)
        info.update(none=none.mean().item(), rotated=rotated.mean().item(), z=z)
        if (QAT_SELECT if select is None else select) and z < spin_quant.CLEAR_Z:
            info["kept"] = "no rotation"
            return (model, model_args, info) + ((optimizer,) if optimizer_args is not None else ())
    if QAT_BASIS == "original":
        out = (wrapped, dict(wrapped.rotated_args), info)
        if optimizer is not None and wrapped.rotation_group() is not None:
            optimizer.add_param_group(wrapped.rotation_group())
        return out + (optimizer,) if optimizer_args is not None else out
    device = next(model.parameters()).device
    rotated = {k: v.detach() for k, v in sq.rotated_state().items()}
    new_args = {**model_args, "norm": sq.config.norm, "tied_head": False,
                "online_transforms": dict(sq.config.online_transforms)}
    with torch.random.fork_rng(devices=[]):
        new_model = GPT(GPTConfig(**new_args)).to(device)
    new_model.load_state_dict(qat_model_state(GPTConfig(**new_args), rotated))
    new_model.set_quantization(model.quantization_enabled)
    new_model.train(model.training)
    if optimizer_args is not None:
        return new_model, new_args, info, qat_optimizer(model, optimizer, new_model, sq, **optimizer_args)
    return new_model, new_args, info
