#!/usr/bin/env bash
# The two pictures in the README: train the default CPU model W8A8 at every site with --store_activations,
# save the integer codes, draw every site's histogram and the overview, and copy two of them to docs/images/.
set -euo pipefail
cd "$(dirname "$0")/.."
python data/shakespeare_char/prepare.py
python train.py --out_dir=out-w8a8 --device=cpu --linear_variant_attn=quantized_linear \
    --linear_variant_mlp=quantized_linear --quantize_linear_bits=8 --quantize_attn_act --quantize_mlp_act \
    --quantize_attn_act_bits=8 --quantize_mlp_act_bits=8 --store_activations --overwrite
python quantization/save_weights.py --out_dir=out-w8a8 --file_name=out-w8a8/quantized_data --file_type=safetensors \
    --overwrite
python quantization/visualize.py --file_name=out-w8a8/quantized_data.safetensors --image_folder=out-w8a8/images \
    --weight=all --graph=histogram
mkdir -p docs/images
cp out-w8a8/images/transformer.h.2.attn.act.softmax_input_histogram.png docs/images/act_softmax_input_histogram.png
cp out-w8a8/images/overview.png docs/images/act_overview.png
