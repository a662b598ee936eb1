"""AutoRound (arXiv 2309.05516): sign-gradient descent on the rounding of each weight and on the range of each
quantization group, block by block, minimising the error of each transformer block's output.

    from quantization.autoround import AutoRound
    records = AutoRound(model, calibration_tokens, bits=4, group_size=32, iters=200).quantize()
"""
from quantization.autoround.autoround import AutoRound
from quantization.autoround.calibration import calibration_samples, capture_block_inputs, run_block
from quantization.autoround.sign_sgd import SignSGD
from quantization.autoround.wrapper import WrapperLinear

__all__ = ["AutoRound", "SignSGD", "WrapperLinear", "calibration_samples", "capture_block_inputs", "run_block"]
