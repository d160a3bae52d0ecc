"""Checkpoints from other frameworks: Google's Switch Transformer releases (Hugging Face format).

    from moe_jax.convert import from_hf
    network, params = from_hf("switch-base-8")       # config.json + model.safetensors
    logits = network.apply({"params": params}, encoder_input_tokens, decoder_input_tokens)

`convert_checkpoint(input_dir, output_dir)` writes an orbax checkpoint + model.gin to
fine-tune from (scripts/convert_checkpoint.py).
"""

from moe_jax.convert.export import convert_checkpoint, save_params
from moe_jax.convert.hf_switch import (SwitchSpec, build_network, from_hf, model_gin,
                                       spec_from_config)
