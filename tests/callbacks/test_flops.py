"""Analytic FLOPs per token against hand calculations."""

import pytest
import transformers

from qlit.callbacks.flops import attention_flops_per_token, flops_per_token, matmul_params, transformer_shape
from qlit.models.shapes import QWEN25


def qwen25_05b_config() -> transformers.Qwen2Config:
    return transformers.Qwen2Config(**QWEN25["qwen2.5-0.5b"])


def test_qwen25_05b_lora_and_full_finetune_match_hand_calculation():
    # Qwen2.5-0.5B: hidden 896, 14 heads of 64, 2 KV heads (KV width 2 × 64 = 128), gated MLP of 4864, 24 layers.
    q = 896 * 896  # 802_816
    k = 896 * 128  # 114_688
    v = 896 * 128  # 114_688
    o = 896 * 896  # 802_816
    attention = q + k + v + o  # 1_835_008
    mlp = 3 * 896 * 4864  # gate, up, down: 13_074_432
    layers = 24 * (attention + mlp)  # 24 × 14_909_440 = 357_826_560
    lm_head = 896 * 151936  # tied to the embedding, but still one matmul per token: 136_134_656
    weights = layers + lm_head
    assert weights == 493_961_216
    assert matmul_params(qwen25_05b_config()) == weights

    seq = 512
    attn = 6 * seq * 896 * 24  # 66_060_288
    # Frozen 4-bit base + LoRA: forward 2W + input-gradient 2W + attention (adapters left out here).
    assert flops_per_token(qwen25_05b_config(), seq) == 4 * 493_961_216 + 66_060_288 == 2_041_905_152
    # Full fine-tuning adds the weight gradients, another 2W.
    assert flops_per_token(qwen25_05b_config(), seq, full_finetune=True) == 6 * 493_961_216 + 66_060_288
    assert flops_per_token(qwen25_05b_config(), seq, full_finetune=True) == 3_029_827_584
    assert attention_flops_per_token(qwen25_05b_config(), seq) == attn


def test_lora_adapter_flops_and_partial_training():
    # LoRA r=16 on q and v of every layer: A (896 × 16) + B (16 × out) per module, 6 FLOPs per adapter weight.
    lora = 24 * ((896 * 16 + 16 * 896) + (896 * 16 + 16 * 128))  # 24 × 45_056 = 1_081_344
    base = 4 * 493_961_216 + 6 * 1024 * 896 * 24
    assert flops_per_token(qwen25_05b_config(), 1024, adapter_params=lora) == base + 6 * 1_081_344
    # Training half of the base weights adds half of their weight-gradient 2W.
    half = flops_per_token(qwen25_05b_config(), 1024, trainable_matmul_params_fraction=0.5)
    assert half == base + 493_961_216
    with pytest.raises(ValueError):
        flops_per_token(qwen25_05b_config(), 1024, trainable_matmul_params_fraction=1.5)


def test_gpt2_names_and_ungated_mlp():
    config = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257)  # n_inner None = 4 × 768
    shape = transformer_shape(config)
    assert (shape.hidden_size, shape.num_layers, shape.intermediate_size, shape.gated_mlp) == (768, 12, 3072, False)
    attention = 4 * 768 * 768  # c_attn (q, k, v) + c_proj: 2_359_296
    mlp = 2 * 768 * 3072  # c_fc + c_proj: 4_718_592
    weights = 12 * (attention + mlp) + 768 * 50257  # 84_934_656 + 38_597_376
    assert matmul_params(config) == weights == 123_532_032
    assert flops_per_token(config, 1024, full_finetune=True) == 6 * 123_532_032 + 6 * 1024 * 768 * 12 == 797_815_296


def test_config_without_sizes_is_rejected():
    with pytest.raises(ValueError, match="hidden_size"):
        transformer_shape(object())
