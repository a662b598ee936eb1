"""SignSGD: each step moves a parameter by lr times the sign of its gradient (AutoRound's optimizer)."""
import torch


class SignSGD(torch.optim.Optimizer):

    def __init__(self, params, lr):
        if lr < 0:
            raise ValueError(f"lr={lr}: must be 0 or more")
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])
        return loss
