"""qlit eval: lm-eval scores the model as it trained (its NF4 base, the adapter on top) exactly as lm-eval's own HFLM
scores that model object, and the scores reach the run's TensorBoard and qlit compare's table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_cli, run_main, scalars
from peft import LoraConfig, PeftModel, PromptTuningConfig
from safetensors.torch import save_file
from transformers import AutoTokenizer

from qlit.errors import QlitError
from qlit.evaluate import evaluate_model
from qlit.export import export_merged
from qlit.models.loading import load_causal_lm, load_tokenizer
from qlit.models.quantization import Quantization
from qlit.module import QLitModule
from qlit.study.compare import collect_runs, table
from qlit.study.compare import main as compare_main

#: Task YAMLs beside this file; their data is qlit_mc.jsonl in the working folder, which the tests write.
TASKS = ROOT / "tests" / "eval_tasks"

ROWS = [
    {"question": "Which word is a colour?", "choices": [" red", " run", " ten"], "answer": 0},
    {"question": "The film was a joy to watch. The review is", "choices": [" negative", " positive"], "answer": 1},
    {"question": "What follows three?", "choices": [" two", " four", " one", " zero"], "answer": 1},
    {"question": "The plot was dull and slow. The review is", "choices": [" negative", " positive"], "answer": 0},
    {"question": "Which animal barks?", "choices": [" cat", " dog", " fish"], "answer": 1},
    {"question": "Which is a number?", "choices": [" seven", " green", " quick"], "answer": 0},
]

#: Float32 on the CPU. Given the same reloaded NF4 model, qlit eval and lm-eval's HFLM agree to the bit (measured: 0.0);
#: against the training module's own model object (the unquantized test) float32 rounding remains (measured: 3.8e-6
#: on log-likelihoods as large as 40, 1e-7 relative). Dropping the adapter or the quantization moves them by more
#: than 1 (measured: 1.2 to 6.4), so the tests also assert a gap of 0.1 there: the tolerance cannot hide either.
SAME_MODEL = {"rtol": 1e-6, "atol": 1e-5}
OTHER_MODEL = 0.1
#: A merged export against base + adapter: merging re-associates the sums of each layer (as in test_export, a few
#: float32 steps on the logits), summed over a choice's tokens.
MERGED = {"rtol": 1e-5, "atol": 1e-4}


@pytest.fixture(scope="module", autouse=True)
def no_environment_report():
    """lm-eval records the machine in every result (``pretty_env_info``: ``pip list``, compiler and driver versions,
    through subprocesses); that takes seconds per run and tells these tests nothing."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The working folder for the module, holding the tasks' data, as a user's folder would."""
    tmp = tmp_path_factory.mktemp("eval")
    (tmp / "qlit_mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        yield tmp


def lm_eval_requests(model, tokenizer, task: str = "qlit_mc") -> dict[str, torch.Tensor]:
    """lm-eval's own run on a model object: per task, the log-likelihood of every choice of every document."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    with torch.no_grad():
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True)
    return {name: requests(rows) for name, rows in out["samples"].items()}


def requests(samples: list[dict]) -> torch.Tensor:
    """The log-likelihoods of a task's requests, in document and choice order (padded with NaN to 4 choices)."""
    rows = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        values = [float(resp[0][0]) for resp in sample["resps"]]  # resps: [[(loglikelihood, is_greedy)], ...]
        rows.append(values + [float("nan")] * (4 - len(values)))
    return torch.tensor(rows, dtype=torch.float64)


def written_requests(path: Path) -> torch.Tensor:
    return requests([json.loads(line) for line in path.read_text().splitlines()])


def largest_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().nan_to_num(0.0).max())


# ----- a QLoRA run: NF4 base + LoRA, trained by qlit fit --------------------------------------------------------------
@pytest.fixture(scope="module")
def nf4_run(workdir):
    """A few steps of the demo (NF4 + double quantization + LoRA on the tiny Qwen2), then ``qlit eval`` on its adapter.

    A larger learning rate than the demo's, so that three steps move the adapter far enough to matter.
    """
    cli = run_cli(
        workdir, "fit", "--config", str(ROOT / "configs/demo.yaml"),
        "--trainer.max_steps", "3", "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "1",
        "--model.init_args.optimizer.init_args.lr", "0.05",
    )  # fmt: skip
    run_dir = Path(cli.trainer.log_dir)
    code = run_main(
        "eval", "--adapter", str(run_dir / "adapter"), "--tasks", "qlit_mc", "--include_path", str(TASKS),
        "--log_samples", "--batch_size", "4",
    )  # fmt: skip
    assert code == 0
    return run_dir


@pytest.mark.slow
def test_nf4_adapter_scores_as_lm_evals_hflm_scores_the_same_quantized_model(nf4_run, tmp_path):
    (samples,) = (nf4_run / "eval").glob("samples_qlit_mc_*.jsonl")
    got = written_requests(samples)
    assert got.shape == (len(ROWS), 4) and not got[:, 0].isnan().any()

    nf4 = Quantization(mode="nf4", double_quant=True, compute_dtype="float32")  # configs/demo.yaml
    base = load_causal_lm("qlit-tiny/qwen2", quantization=nf4, dtype="auto", device=torch.device("cpu"))
    model = PeftModel.from_pretrained(base, str(nf4_run / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(nf4_run / "adapter")
    expected = lm_eval_requests(model, tokenizer)["qlit_mc"]
    torch.testing.assert_close(got, expected, equal_nan=True, **SAME_MODEL)

    # The tolerance cannot hide the two ways of evaluating another model: without the adapter, or on the
    # full-precision base (what loading the base by name in lm-eval would do).
    with model.disable_adapter():
        without_adapter = lm_eval_requests(model, tokenizer)["qlit_mc"]
    full = load_causal_lm("qlit-tiny/qwen2", quantization=Quantization(), dtype="float32", device=torch.device("cpu"))
    unquantized = lm_eval_requests(PeftModel.from_pretrained(full, str(nf4_run / "adapter")).eval(), tokenizer)
    assert largest_gap(expected, without_adapter) > OTHER_MODEL
    assert largest_gap(expected, unquantized["qlit_mc"]) > OTHER_MODEL

    # The base alone, loaded as it was stored in training: the baseline a QLoRA study compares the adapter against.
    out = tmp_path / "baseline"
    spec = "{mode: nf4, double_quant: true, compute_dtype: float32}"
    args = ("--model", "qlit-tiny/qwen2", "--quantization", spec, "--output", str(out), "--log_samples")
    assert run_main("eval", *args, "--tasks", "qlit_mc", "--include_path", str(TASKS), "--batch_size", "4") == 0
    (samples,) = out.glob("samples_qlit_mc_*.jsonl")
    torch.testing.assert_close(written_requests(samples), without_adapter, equal_nan=True, **SAME_MODEL)


@pytest.mark.slow
def test_scores_land_in_the_runs_tensorboard_and_in_compare(nf4_run, capsys):
    (results_file,) = (nf4_run / "eval").glob("results_*.json")
    results = json.loads(results_file.read_text())
    acc = results["results"]["qlit_mc"]["acc,none"]
    assert results["qlit"]["quantization"]["mode"] == "nf4" and results["n-samples"]["qlit_mc"]["effective"] == 6

    logged = scalars(nf4_run)
    trained_until = max(step for tag, points in logged.items() if not tag.startswith("eval/") for step, _ in points)
    assert logged["eval/qlit_mc/acc"] == [(trained_until, pytest.approx(acc))]
    assert logged["eval/qlit_mc/acc_norm"][0][1] == pytest.approx(results["results"]["qlit_mc"]["acc_norm,none"])
    assert "eval/qlit_mc/acc_stderr" in logged

    (row,) = table(collect_runs([nf4_run]))
    assert row["eval/qlit_mc/acc"] == pytest.approx(acc) and row["quantization"] == "nf4"
    assert "eval/qlit_mc/acc_stderr" not in row  # standard errors stay in TensorBoard and the JSON
    compare_main([str(nf4_run)])
    header = capsys.readouterr().out.splitlines()[0]
    assert "| eval/qlit_mc/acc |" in header and "| eval/qlit_mc/acc_norm |" in header


@pytest.mark.slow
def test_a_checkpoint_scores_as_the_adapter_its_run_saved(nf4_run, tmp_path):
    outcome = evaluate_model(
        "qlit_mc",
        adapter=nf4_run / "checkpoints" / "last.ckpt",
        include_path=TASKS,
        log_samples=True,
        batch_size=4,
        output=tmp_path / "out",
        log_dir=tmp_path / "tb",
    )
    (from_adapter,) = (nf4_run / "eval").glob("samples_qlit_mc_*.jsonl")
    torch.testing.assert_close(
        written_requests(outcome.samples["qlit_mc"]), written_requests(from_adapter), equal_nan=True, **SAME_MODEL
    )
    assert outcome.path.parent == tmp_path / "out"
    assert scalars(tmp_path / "tb")["eval/qlit_mc/acc"] == [(3, pytest.approx(outcome.scores["eval/qlit_mc/acc"]))]


# ----- without quantization: an adapter on a float32 base, and its merged export --------------------------------------
@pytest.mark.slow
def test_unquantized_adapter_and_its_export_score_alike_and_a_group_is_one_column(workdir, tmp_path):
    torch.manual_seed(0)
    module = QLitModule(
        pretrained="qlit-tiny/qwen2",
        dtype="float32",
        adapter=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
    )
    module.configure_model()
    for name, param in module.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would make the adapter a no-op
            torch.nn.init.normal_(param, std=0.02)
    module.tokenizer = load_tokenizer("qlit-tiny/qwen2")
    module.save_adapter_to(tmp_path / "adapter")

    outcome = evaluate_model("qlit_mc_group", adapter=tmp_path / "adapter", include_path=TASKS, log_samples=True)
    # No run around this adapter: the results go beside it, and there is no TensorBoard run to log to.
    assert outcome.run_dir is None and outcome.path.parent == tmp_path / "adapter" / "eval"
    # The group is one column, its size-weighted mean accuracy; its tasks stay in the JSON.
    assert set(outcome.scores) == {"eval/qlit_mc_group/acc", "eval/qlit_mc_group/acc_stderr"}
    per_task = outcome.results["results"]
    assert outcome.scores["eval/qlit_mc_group/acc"] == pytest.approx(
        (per_task["qlit_mc"]["acc,none"] + per_task["qlit_mc_review"]["acc,none"]) / 2
    )
    got = {task: written_requests(path) for task, path in outcome.samples.items()}
    expected = lm_eval_requests(module.model.eval(), module.tokenizer, "qlit_mc_group")
    assert set(got) == set(expected) == {"qlit_mc", "qlit_mc_review"}
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], equal_nan=True, **SAME_MODEL)

    merged = export_merged(tmp_path / "adapter", tmp_path / "merged")
    exported = evaluate_model("qlit_mc", model=str(merged), include_path=TASKS, log_samples=True)
    assert exported.path.parent == merged / "eval" and exported.run_dir is None
    torch.testing.assert_close(written_requests(exported.samples["qlit_mc"]), got["qlit_mc"], equal_nan=True, **MERGED)
    with module.model.disable_adapter():  # the merge carries the adapter: without it the scores move
        base = lm_eval_requests(module.model, module.tokenizer)["qlit_mc"]
    assert largest_gap(base, got["qlit_mc"]) > OTHER_MODEL


# ----- bad input: one sentence each, before any weight loads ----------------------------------------------------------
@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    """An adapter directory as peft writes it (its weights, zeros here, are never loaded by these tests)."""
    PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4).save_pretrained(tmp_path / "adapter")
    save_file({"prompt_embeddings": torch.zeros(4, 64)}, tmp_path / "adapter" / "adapter_model.safetensors")
    return tmp_path / "adapter"


def eval_error(capsys, *args: str) -> tuple[int, str]:
    code = run_main("eval", *args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("qlit eval: error: ")
    return code, err[0]


def test_a_missing_adapter_is_named(tmp_path, capsys):
    code, err = eval_error(capsys, "--adapter", str(tmp_path / "no-such"), "--tasks", "qlit_mc")
    assert code == 1 and str(tmp_path / "no-such") in err and "adapter_config.json" in err
    code, err = eval_error(capsys, "--adapter", str(tmp_path / "last.ckpt"), "--tasks", "qlit_mc")
    assert code == 1 and f"'{tmp_path / 'last.ckpt'}' does not exist" in err and "checkpoint" in err
    code, err = eval_error(capsys, "--tasks", "qlit_mc")
    assert code == 1 and "--adapter" in err and "--model" in err


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--limit", "0", "--limit"),
        ("--limit", "-5", "--limit"),
        ("--limit", "1.5", "--limit"),
        ("--limit", "nan", "--limit"),
        ("--num_fewshot", "-1", "--num_fewshot"),
        ("--batch_size", "0", "--batch_size"),
        ("--tasks", " , ", "--tasks"),
        ("--include_path", "no-such-folder", "--include_path"),
        ("--device", "cuda:0" if not torch.cuda.is_available() else "tpu", "--device"),
        ("--quantization", "nf5", "nf5"),
        ("--quantization", "{mode: nf4, bits: 3}", "bits"),
    ],
)
def test_a_bad_option_is_one_sentence(adapter_dir, capsys, option, value, named):
    args = {"--adapter": str(adapter_dir), "--tasks": "qlit_mc", option: value}
    code, err = eval_error(capsys, *[part for pair in args.items() for part in pair])
    assert code == 1 and named in err and (option == "--quantization" or value.strip(" ,") in err)


def test_a_task_whose_data_is_unreachable_says_how_to_use_a_local_copy(adapter_dir, capsys):
    # The hub is unreachable here (tests run offline): the dataset of qlit_mc_hub cannot be fetched.
    code, err = eval_error(
        capsys, "--adapter", str(adapter_dir), "--tasks", "qlit_mc_hub", "--include_path", str(TASKS)
    )
    assert code == 1
    assert "'qlit_mc_hub'" in err and "qlit-tests/no-such-dataset" in err
    assert "dataset_path: json" in err and "data_files" in err and "--include_path" in err


def test_without_lm_eval_installed_one_sentence_says_how_to_install_it(adapter_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(QlitError, match=r"not installed: pip install 'qlit\[eval\]'"):
        evaluate_model("qlit_mc", adapter=adapter_dir)


@pytest.mark.slow
def test_builtin_tasks_unknown_or_offline(adapter_dir, capsys):
    # The whole catalogue of lm-eval's built-in tasks (indexed once per process).
    code, err = eval_error(capsys, "--adapter", str(adapter_dir), "--tasks", "hellaswg")
    assert code == 1 and "'hellaswg'" in err and "did you mean 'hellaswag'" in err and "--include_path" in err
    code, err = eval_error(capsys, "--adapter", str(adapter_dir), "--tasks", "hellaswag")
    assert code == 1 and "'hellaswag'" in err and "hellaswag.yaml" in err and "dataset_path: json" in err


# ----- lm-eval's own command line, and a console that carries its table and qlit's lines only -------------------------
@pytest.mark.slow
def test_lm_evals_command_line_runs_and_the_console_holds_the_table_and_qlits_lines_only(workdir, tmp_path):
    """`lm-eval run`'s options for an adapter (``--model hf --model_args pretrained=..,peft=.. --gen_kwargs ...``),
    through the ``qlit`` console entry in a folder outside any git repository: the scores land where lm-eval puts
    them, the generation settings reach the generating task, stdout holds lm-eval's table and qlit's lines, and
    stderr nothing (neither git's ``fatal:``, nor a FutureWarning, nor a progress bar)."""
    outside_git = subprocess.run(["git", "rev-parse"], cwd=workdir, capture_output=True)
    assert outside_git.returncode != 0  # where lm-eval's `git describe` makes git print its `fatal:` line
    torch.manual_seed(0)
    module = QLitModule(pretrained="qlit-tiny/qwen2", adapter=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    module.configure_model()
    module.save_adapter_to(tmp_path / "adapter")  # peft's loading raises a FutureWarning of transformers' here
    out = tmp_path / "scores.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "qlit", "eval", "--model", "hf",
            "--model_args", f"pretrained=qlit-tiny/qwen2,peft={tmp_path / 'adapter'},dtype=float32",
            "--tasks", "qlit_mc", "qlit_gen", "--include_path", str(TASKS), "--batch_size", "4",
            "--gen_kwargs", "max_gen_toks=2", "--output_path", str(out), "--log_samples",
        ],
        cwd=workdir, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith(("|", "qlit eval: "))] == []
    assert any(line.startswith("|qlit_mc ") and "|acc " in line for line in lines)  # lm-eval's table
    assert any(line.startswith("|qlit_gen") and "|exact_match|" in line for line in lines)

    # lm-eval's results file for a .json --output_path: <name>_<time>.json, the samples beside it.
    (results_file,) = tmp_path.glob("scores_*.json")
    results = json.loads(results_file.read_text())
    assert results["qlit"]["adapter"] == str(tmp_path / "adapter")
    assert results["qlit"]["base"] == "qlit-tiny/qwen2" and results["qlit"]["dtype"] == "float32"
    assert results["config"]["gen_kwargs"] == {"max_gen_toks": 2}
    assert results["configs"]["qlit_gen"]["generation_kwargs"]["max_gen_toks"] == 2  # the task's own said 8
    (samples,) = tmp_path.glob("samples_qlit_gen_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == len(ROWS)
    for row in rows:  # each request the model got: the task's settings, updated by --gen_kwargs
        (request,) = row["arguments"]
        assert request[1] == {"until": ["\n"], "max_gen_toks": 2, "do_sample": False}
        assert row["resps"][0][0]  # it generated


@pytest.mark.slow
def test_requests_cut_to_the_models_context_are_one_qlit_line(workdir, tmp_path, capsys):
    # A context of 6 tokens: every prompt of qlit_mc is longer, so lm-eval cuts each request from the left and warns
    # once per request; the console gets one line that says how many, and the scores are still written.
    args = ("--model", "qlit-tiny/qwen2", "--model_args", "max_length=6", "--output_path", str(tmp_path / "out"))
    assert run_main("eval", *args, "--tasks", "qlit_mc", "--include_path", str(TASKS), "--device", "cpu") == 0
    out, err = capsys.readouterr()
    choices = sum(len(row["choices"]) for row in ROWS)
    (line,) = [line for line in out.splitlines() if "longer than the model's context" in line]
    assert line.startswith(f"qlit eval: {choices} request(s) were longer than the model's context (6 tokens)")
    assert err.strip() == ""  # lm-eval's own warning, one per request, stays off the console
    (results,) = (tmp_path / "out").glob("results_*.json")
    assert json.loads(results.read_text())["n-samples"]["qlit_mc"]["effective"] == len(ROWS)


@pytest.fixture
def handed_over(monkeypatch) -> list[dict]:
    """What `qlit eval`'s command line hands :func:`evaluate_model`, which stops there (nothing is loaded)."""
    calls: list[dict] = []

    def record(**options):
        calls.append(options)
        raise QlitError("stopped here")

    monkeypatch.setattr("qlit.evaluate.evaluate_model", record)
    return calls


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--model", "hf", "--model_args", "pretrained=org/model,dtype=bfloat16,revision=v2,trust_remote_code=True"],
            {"model": "org/model", "adapter": None, "dtype": "bfloat16", "revision": "v2", "trust_remote_code": True},
        ),
        (["--adapter", "run/adapter", "--model_args", "pretrained=copies/base"], {"base": "copies/base"}),
        # lm-eval's other forms: several key=value arguments, or one JSON object; peft= is the adapter.
        (
            ["--model_args", "pretrained=copies/base", "peft=run/adapter", "max_length=64"],
            {"adapter": "run/adapter", "base": "copies/base", "model": None, "max_length": 64},
        ),
        (["--model_args", '{"pretrained": "org/model", "batch_size": 2}'], {"model": "org/model", "batch_size": 2}),
        (
            ["--model", "m", "--model_args", "load_in_4bit=True,bnb_4bit_quant_type=nf4,bnb_4bit_compute_dtype=bf16"],
            {"quantization": Quantization(mode="nf4", compute_dtype="bfloat16", double_quant=False)},
        ),
        (  # transformers' BitsAndBytesConfig defaults: FP4, float32 compute
            ["--model", "m", "--model_args", "load_in_4bit=True"],
            {"quantization": Quantization(mode="fp4", compute_dtype="float32", double_quant=False)},
        ),
        (["--model", "m", "--model_args", "load_in_8bit=True"], {"quantization": Quantization(mode="int8")}),
        (["--model", "m", "--output_path", "scores"], {"output": "scores"}),
        (["--model", "m", "--output", "scores"], {"output": "scores"}),  # qlit's earlier name
        (
            ["--model", "m", "--gen_kwargs", "temperature=0,until=['\\n']", "max_gen_toks=5"],
            {"gen_kwargs": {"temperature": 0, "until": ["\n"], "max_gen_toks": 5}},
        ),
        (["--model", "m", "--tasks", "qlit_gen", "qlit_mc_group"], {"tasks": ["qlit_gen", "qlit_mc_group"]}),
    ],
)
def test_lm_evals_option_names_set_qlits_options(handed_over, capsys, args, expected):
    tasks = [] if "--tasks" in args else ["--tasks", "qlit_mc"]
    assert run_main("eval", *args, *tasks) == 1
    (options,) = handed_over
    assert {name: options.get(name) for name in expected} == expected


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--model", "m", "--model_args", "parallelize=True"], "'parallelize' has no meaning in qlit eval"),
        (["--model", "hf", "--model_args", "dtype=float32"], "--model_args pretrained="),
        (["--model", "m", "--device", "cpu", "--model_args", "device=cuda"], "--device cpu and --model_args device"),
        (["--model", "m", "--model_args", "pretrained=other"], "--model m and --model_args pretrained disagree"),
        (["--model", "m", "--model_args", "batch_size=auto"], "batch_size=auto must be a whole number"),
        (["--model", "m", "--model_args", "bnb_4bit_quant_type=nf4"], "load_in_4bit=True"),
        (["--model", "m", "--quantization", "nf4", "--model_args", "load_in_8bit=True"], "--quantization and"),
        (["--model", "m", "--model_args", "dtype=int3"], "dtype 'int3'"),
        (["--model", "m", "--gen_kwargs", "greedy"], "--gen_kwargs 'greedy' is not key=value"),
    ],
)
def test_a_model_arg_without_a_meaning_here_is_one_sentence(capsys, args, named):
    code, err = eval_error(capsys, *args, "--tasks", "qlit_mc")
    assert code == 1 and named in err


def test_eval_help_lists_its_options_without_loading_torch():
    code = (
        "import sys; from qlit.cli import main\n"
        "try:\n    main(['eval', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in ('torch', 'lightning', 'transformers', 'lm_eval') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip().endswith("[]"), done.stdout
    for option in ("--adapter", "--model", "--tasks", "--limit", "--num_fewshot", "--batch_size", "--device"):
        assert option in done.stdout, option
    for option in ("--output_path", "--include_path", "--model_args", "--gen_kwargs"):  # lm-eval's names
        assert option in done.stdout, option
