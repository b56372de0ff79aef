"""Parameter counts of a 4-bit + LoRA model agree with peft's own; the weights' size shows the quantization."""

import peft
import pytest
import torch
import transformers
from tiny_lm import TINY_QWEN2, RecordingLogger, TinyLM, cpu_trainer, loader

from qlit.callbacks import TrainableParamsMonitor
from qlit.callbacks.params import count_parameters, weight_bytes


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**TINY_QWEN2)).save_pretrained(directory)
    return str(directory)


def load_4bit(directory: str) -> torch.nn.Module:
    bnb = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=bnb, device_map={"": "cpu"})


def test_4bit_lora_counts_match_peft(tiny_dir: str):
    full = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    full_params = sum(p.numel() for p in full.parameters())
    model = peft.get_peft_model(load_4bit(tiny_dir), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())  # really quantized

    trainable, total = count_parameters(model)
    assert (trainable, total) == model.get_nb_trainable_parameters()
    # LoRA r=4 on q (64 → 64) and v (64 → 32) of 2 layers; the 4-bit base counts at its logical size.
    assert trainable == 2 * (4 * (64 + 64) + 4 * (64 + 32)) == 1792
    assert total == full_params + trainable
    # NF4 stores the linear layers in half a byte (plus scales) instead of 4 bytes: the weights shrink a lot.
    assert weight_bytes(model) < 0.8 * weight_bytes(full)


def test_callback_logs_scalars_and_hparams_with_the_module_hparams():
    logger = RecordingLogger()
    monitor = TrainableParamsMonitor()
    trainer = cpu_trainer(max_steps=1, logger=logger, callbacks=[monitor])
    trainer.fit(TinyLM(train_seconds=0.25), train_dataloaders=loader(1))
    (step, scalars), *_ = [(s, m) for s, m in logger.records if "params/trainable" in m]
    assert step == 0
    reference = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**TINY_QWEN2))
    total = sum(p.numel() for p in reference.parameters())
    assert scalars["params/total"] == scalars["params/trainable"] == total
    assert scalars["params/trainable_ratio"] == 1.0
    buffers = sum(b.numel() * b.element_size() for b in reference.buffers())  # RoPE's inv_freq
    assert scalars["params/weight_gib"] == pytest.approx((total * 4 + buffers) / 2**30)
    first = logger.hparams[0]  # the first record is the one TensorBoard shows: it must hold both
    assert first["params/trainable"] == total and first["train_seconds"] == 0.25


def test_a_packed_bitnet_base_with_lora_counts_its_ternary_weights(tiny_dir: str):
    # QLoRA + BitNet: the frozen ternary weights are uint8 buffers, four to a byte; the total is still the model's.
    from qlit.models.bitnet import apply_bitnet

    full = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    full_params = sum(p.numel() for p in full.parameters())
    apply_bitnet(full, mode="frozen")
    assert not any(isinstance(m, torch.nn.Linear) and "weight" in m._parameters for m in full.model.layers.modules())
    model = peft.get_peft_model(full, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = count_parameters(model)
    assert trainable == 1792  # as on the 4-bit base above
    assert total == full_params + trainable
