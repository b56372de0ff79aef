"""The static-cache greedy loop gives transformers' generate tokens, and the generation path is chosen as documented.

The loop under test is the one the CUDA graph records (``qlit.generation``); on the CPU it runs unrecorded, so its
tokens are checked here against ``generate(do_sample=False)`` on float32 tiny models with a random LoRA, for each
quantization a tiny model can be loaded in, with prompts of mixed lengths (left-padded) in one batch.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig

from qlit.errors import QlitError
from qlit.generation import CHECK_EVERY, Generator, eager_generate, graph_reasons, greedy
from qlit.models.loading import load_tokenizer
from qlit.models.quantization import Quantization
from qlit.module import QLitModule

LENGTHS = (3, 11, 7, 1)  # prompt tokens of each row: left-padded to 11
CUDA = torch.device("cuda")  # a device object only: graph_reasons reads its type


def _module(arch: str = "qwen2", mode: str = "none", adapter=None, **kwargs) -> QLitModule:
    torch.manual_seed(0)
    module = QLitModule(
        pretrained=f"qlit-tiny/{arch}",
        quantization=Quantization(mode=mode),
        dtype="float32",
        adapter=adapter or LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        **kwargs,
    )
    module.configure_model()
    module.eval()
    for name, param in module.model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: peft starts B at zero, where LoRA changes nothing
            torch.nn.init.normal_(param, std=0.1)
    module.tokenizer = load_tokenizer(f"qlit-tiny/{arch}")
    return module


def _prompts(pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    width = max(LENGTHS)
    ids = torch.full((len(LENGTHS), width), pad)
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        ids[row, width - n :] = torch.randint(5, 200, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def _generate(model, ids, mask, new, eos, pad, **kwargs) -> torch.Tensor:
    """transformers' greedy generate, its new tokens."""
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
        **kwargs,
    )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize(
    ("arch", "mode"),
    [("qwen2", "none"), ("llama", "none"), ("gpt2", "none"), ("qwen2", "int8"), ("qwen2", "nf4"), ("qwen2", "bitnet")],
)
@torch.no_grad()
def test_static_loop_gives_generate_tokens_for_a_batch_of_mixed_prompt_lengths(arch, mode):
    module = _module(arch, mode)
    model, pad = module.model, module.tokenizer.pad_token_id
    model.generation_config.eos_token_id = None
    ids, mask = _prompts(pad)
    new = 12
    # Without an end-of-sequence id every row runs to the end: the loop's tokens are generate's, step by step.
    free = _generate(model, ids, mask, new, None, pad)
    assert free.shape == (len(LENGTHS), new)
    assert torch.equal(greedy(model, ids, mask, max_new_tokens=new, eos_token_id=None, pad_token_id=pad).tokens, free)
    # End-of-sequence ids that each row meets at another step (its 2nd, 4th, ... token): the rows stop one by one,
    # a finished row is padded while the others go on, and the output ends where the last row ended.
    stops = sorted({int(free[row, 1 + 2 * row]) for row in range(len(LENGTHS))})
    expected = _generate(model, ids, mask, new, stops, pad)
    assert expected.shape[1] < new and (expected == pad).any()
    ours = greedy(model, ids, mask, max_new_tokens=new, eos_token_id=stops, pad_token_id=pad)
    assert torch.equal(ours.tokens, expected)
    # Whether every row has ended is asked every CHECK_EVERY steps (each question waits for the device).
    assert ours.path == "static" and 0 <= ours.decode_steps - (expected.shape[1] - 1) < CHECK_EVERY
    # Suppressing the end-of-sequence ids for the first tokens (the latency probe's fixed length) changes the rows
    # as it changes generate's.
    suppressed = _generate(model, ids, mask, new, stops, pad, min_new_tokens=6)
    assert not torch.equal(suppressed[:, :6], expected[:, :6])
    ours = greedy(model, ids, mask, max_new_tokens=new, eos_token_id=stops, pad_token_id=pad, min_new_tokens=6)
    assert torch.equal(ours.tokens, suppressed)


@torch.no_grad()
def test_a_cache_longer_than_needed_and_a_prompt_without_padding_give_the_same_tokens():
    module = _module()
    model, pad, eos = module.model, module.tokenizer.pad_token_id, module.tokenizer.eos_token_id
    ids, mask = _prompts(pad)
    expected = _generate(model, ids, mask, 9, eos, pad)
    ours = greedy(model, ids, mask, max_new_tokens=9, eos_token_id=eos, pad_token_id=pad, cache_length=300)
    assert torch.equal(ours.tokens, expected)
    row = ids[1:2]  # the longest prompt alone: no padding at all, so generate's mask is plainly causal
    assert torch.equal(
        greedy(model, row, None, max_new_tokens=9, eos_token_id=eos, pad_token_id=pad).tokens,
        _generate(model, row, torch.ones_like(row), 9, eos, pad),
    )


@torch.no_grad()
def test_eager_attention_takes_the_mask_added_and_gives_the_same_tokens():
    module = _module("llama", attn_implementation="eager")
    model, pad, eos = module.model, module.tokenizer.pad_token_id, module.tokenizer.eos_token_id
    assert model.config._attn_implementation == "eager"
    ids, mask = _prompts(pad)
    expected = _generate(model, ids, mask, 10, eos, pad)
    assert torch.equal(greedy(model, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=pad).tokens, expected)


@torch.no_grad()
def test_both_paths_decode_greedily_without_the_checkpoints_repetition_penalty():
    module = _module()
    model, pad = module.model, module.tokenizer.pad_token_id
    ids, mask = _prompts(pad)
    model.generation_config.repetition_penalty = 3.0  # what an instruct checkpoint's generation_config.json may set
    penalised = _generate(model, ids, mask, 12, None, pad)
    plain = greedy(model, ids, mask, max_new_tokens=12, eos_token_id=None, pad_token_id=pad).tokens
    eager = eager_generate(model, ids, mask, max_new_tokens=12, eos_token_id=None, pad_token_id=pad)
    assert torch.equal(eager.tokens, plain) and not torch.equal(penalised, plain)
    # Its timing: the prefill ends with the first token's scores, every later token is a decoding step.
    assert eager.path == "eager" and eager.prefill_seconds > 0 and eager.decode_seconds > 0
    assert eager.decode_steps == eager.tokens.shape[1] - 1


def test_the_module_generates_through_its_generator_and_times_prefill_and_decoding_apart():
    module = _module()
    tok = module.tokenizer
    ids, mask = _prompts(tok.pad_token_id)
    texts, timing = module.generate({"prompt_input_ids": ids, "prompt_attention_mask": mask})
    assert module.generator.choice == "auto" and module.generator.off_because == "a CUDA device"
    with torch.no_grad():
        expected = _generate(module.model, ids, mask, module.max_new_tokens, tok.eos_token_id, tok.pad_token_id)
    assert texts == tok.batch_decode(expected, skip_special_tokens=True)
    assert timing["samples"] == len(LENGTHS) and timing["decode_steps"] == expected.shape[1] - 1
    assert timing["seconds"] == pytest.approx(timing["prefill_seconds"] + timing["decode_seconds"])


def test_generation_choices_are_checked_and_graphs_are_refused_where_they_cannot_record():
    with pytest.raises(QlitError, match="model.generation must be auto, graphs or eager, got 'fast'"):
        QLitModule(pretrained="qlit-tiny/qwen2", generation="fast")
    module = _module(generation="graphs")
    ids, mask = _prompts(module.tokenizer.pad_token_id)
    with pytest.raises(QlitError, match="model.generation: graphs needs a CUDA device: set it to auto or eager"):
        module.generate({"prompt_input_ids": ids, "prompt_attention_mask": mask})


def test_what_the_recorded_decode_step_needs_is_said_in_words():
    module = _module()
    model = module.model
    assert graph_reasons(model, CUDA, allows_graphs=True) == []
    assert graph_reasons(model, torch.device("cpu"), allows_graphs=False) == [
        "a CUDA device",
        "an unquantized or 4-bit base",
    ]
    model.config._attn_implementation = "flash_attention_2"  # takes no prepared mask
    model.config.layer_types = ["full_attention", "sliding_attention"]
    model.generation_config.suppress_tokens = [5]
    assert graph_reasons(model, CUDA, allows_graphs=True) == [
        "SDPA or eager attention (model.attn_implementation)",
        "full attention in every layer (no sliding window)",
        "plain greedy decoding (the checkpoint's generation config sets suppress_tokens)",
    ]
    prompt = _module(adapter=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert graph_reasons(prompt.model, CUDA, allows_graphs=True) == ["an adapter that is not prompt learning"]


def test_the_backend_decides_for_its_layers_and_eager_generation_is_the_fallback():
    module = _module(mode="int8")
    assert module.quantization.backend.allows_cuda_graphs is False  # LLM.int8()'s outlier split syncs the host
    generator = Generator("auto")
    ids, mask = _prompts(module.tokenizer.pad_token_id)
    out = generator.generate(
        module.model, ids, mask, max_new_tokens=4, eos_token_id=None, pad_token_id=0, allows_graphs=False
    )
    assert out.path == "eager" and generator.off_because == "a CUDA device; an unquantized or 4-bit base"


@torch.no_grad()
def test_calls_share_the_recorded_steps_of_their_batch_size_where_the_cache_holds_them(monkeypatch):
    """The bookkeeping of recorded steps, on the CPU: the step runs unrecorded in place of its replay."""
    from qlit import generation

    monkeypatch.setattr(generation, "graph_reasons", lambda *args: [])
    monkeypatch.setattr(generation.torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(generation._StaticDecoder, "_advance", lambda self, record: self._step())
    monkeypatch.setattr(generation, "LENGTH_STEP", 16)
    module = _module()
    model, pad, eos = module.model, module.tokenizer.pad_token_id, module.tokenizer.eos_token_id
    generator = Generator("graphs")
    ids, mask = _prompts(pad)
    for width in (11, 6, 3):  # the same rows, shorter prompts: one cache of 32 slots holds them all
        batch, batch_mask = ids[:, -width:], mask[:, -width:]
        out = generator.generate(model, batch, batch_mask, max_new_tokens=9, eos_token_id=eos, pad_token_id=pad)
        assert out.path == "graphs" and torch.equal(out.tokens, _generate(model, batch, batch_mask, 9, eos, pad))
    assert [key[1:3] for key in generator._decoders] == [(4, 32)]
    generator.generate(model, ids[:2], mask[:2], max_new_tokens=9, eos_token_id=eos, pad_token_id=pad)
    out = generator.generate(model, ids, mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=pad)  # 11 + 30 > 32
    assert torch.equal(out.tokens, _generate(model, ids, mask, 30, eos, pad))
    assert [key[1:3] for key in generator._decoders] == [(4, 32), (2, 32), (4, 48)]
    generator.release()
    assert not generator._decoders


def test_a_fit_plans_its_generated_rows_and_logs_stderrs_and_decoding_latency(tmp_path, caplog):
    from helpers import ROOT, run_cli, scalars

    with caplog.at_level("INFO"):
        cli = run_cli(
            tmp_path,
            "fit",
            "--config",
            str(ROOT / "configs/demo_squad.yaml"),
            *("--data.init_args.generate_val_samples", "auto", "--trainer.max_steps", "4"),
            *("--trainer.max_epochs", "-1", "--trainer.val_check_interval", "4", "--trainer.num_sanity_val_steps", "1"),
            *("--latency.probe_samples", "2", "--latency.probe_new_tokens", "4"),
        )
    task = cli.model.task
    # The sanity check measured a row's cost and the first validation planned the rows from it, in one line.
    assert task._planned and "generate_val_samples auto: " in caplog.text
    assert task.max_generate_rows is None or task.max_generate_rows >= 1
    logged = scalars(cli.trainer.log_dir)
    for tag in ("val/f1", "val/f1_stderr", "val/exact_match_stderr", "val/prefill_ms", "val/decode_ms_per_token"):
        assert tag in logged, tag
    assert logged["val/batch_decode_ms_per_token"][-1][1] > 0
    assert not cli.model.generator._decoders  # nothing recorded is kept past the pass (none is on the CPU)


@torch.no_grad()
def test_qlit_evals_greedy_generations_go_through_the_static_loop_with_lm_evals_answers(tmp_path, monkeypatch):
    """``qlit eval``'s generating task: the answers lm-eval scores are the same through qlit's loop (run here on
    the CPU in place of the recorded step) as through lm-eval's call of ``generate``."""
    import json

    pytest.importorskip("lm_eval")
    from helpers import ROOT

    from qlit import generation
    from qlit.evaluate import evaluate_model

    monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)  # pip list and drivers: seconds
    rows = [{"question": q, "choices": [" a", " b"], "answer": 0} for q in ("Which colour?", "What follows three?")]
    rows += [{"question": "The plot was dull and slow. The review is", "choices": [" no", " yes"], "answer": 1}]
    (tmp_path / "qlit_mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.chdir(tmp_path)
    _module().save_adapter_to(tmp_path / "adapter")  # a LoRA whose B is not zero: it changes the answers

    def answers(choice: str) -> list[str]:
        evaluate_model(
            ["qlit_gen"],
            adapter=tmp_path / "adapter",
            include_path=ROOT / "tests" / "eval_tasks",
            device="cpu",
            log_samples=True,
            output=tmp_path / choice,
            gen_kwargs={"max_gen_toks": 6},
            generation=choice,
        )
        (samples,) = (tmp_path / choice).glob("samples_qlit_gen_*.jsonl")
        return [json.loads(line)["resps"][0][0] for line in samples.read_text().splitlines()]

    eager = answers("eager")
    runs = []
    run = generation._StaticDecoder.run
    monkeypatch.setattr(generation, "graph_reasons", lambda *args: [])
    monkeypatch.setattr(generation.torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(generation._StaticDecoder, "_advance", lambda self, record: self._step())
    monkeypatch.setattr(generation._StaticDecoder, "run", lambda self, *a, **k: runs.append(a) or run(self, *a, **k))
    assert answers("graphs") == eager and any(eager)
    assert runs  # the loop did generate them
