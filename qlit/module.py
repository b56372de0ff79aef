"""QLitModule: one LightningModule for any Hugging Face causal LM, any quantization and any peft method."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from peft import PeftConfig
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics import MeanMetric, MetricCollection

from qlit.batch import IGNORE_INDEX, Batch, samples_in
from qlit.errors import QlitError
from qlit.generation import Generated, GenerationChoice, Generator
from qlit.models import attention, layers, memory_plan
from qlit.models.adapters import (
    AdapterStart,
    Calibration,
    adapter_base,
    check_adapter,
    check_adapter_storage,
    load_adapter,
    start_adapter,
)
from qlit.models.fused_lora import apply_fused_lora, check_fused_lora
from qlit.models.graphs import GraphsChoice, LayerGraphs, check_graphs, graphable_layers, recordable
from qlit.models.kernels import KernelChoice, apply_kernels, check_kernels
from qlit.models.loading import checkpoint_quantization, load_causal_lm, same_base
from qlit.models.offload import Offloader, offload_layers
from qlit.models.quantization import Quantization
from qlit.naming import adapter_name
from qlit.optim import WarmupCosineLR
from qlit.paths import QLIT_BASE_FILE
from qlit.tasks import Task

log = logging.getLogger(__name__)

#: The key under which a checkpoint records the base it was trained on (:meth:`QLitModule.base_spec`). Not in
#: ``hyper_parameters``, which Lightning would pass back to the constructor when loading.
CHECKPOINT_BASE_KEY = "qlit_base"


class QLitModule(pl.LightningModule):
    """Fine-tunes a Hugging Face causal LM, optionally quantized, with a peft adapter or fully.

    The model is loaded in :meth:`configure_model`, onto the device Lightning gives this process, so that
    multi-device strategies can place or shard it. What a validation batch is judged by comes from the
    DataModule's task; loss and perplexity are logged for every task.

    Args:
        pretrained: hub id (``Qwen/Qwen2.5-0.5B-Instruct``), local directory, or ``qlit-tiny/<arch>`` for a tiny
            offline model. The DataModule's tokenizer is linked to this value.
        revision: hub revision (branch, tag or commit) of the weights.
        trust_remote_code: run model code shipped in the hub repository; off unless you trust its author.
        dtype: dtype of the weights that are not quantized (``auto``: the checkpoint's own, or the quantization's
            compute dtype when quantized).
        attn_implementation: ``auto`` (packed batches through PyTorch's variable-length flash kernel on CUDA,
            :mod:`qlit.models.attention`; SDPA elsewhere), or any of transformers' names: ``sdpa``, ``eager``,
            ``flash_attention_2``, ... (``None``: transformers' default).
        kernels: fused training kernels: ``auto`` uses Liger's (fused linear + cross-entropy, RMSNorm, RoPE,
            SwiGLU) on CUDA where liger-kernel is installed; ``liger`` insists; ``none`` keeps transformers' modules.
        quantization: how the base weights are stored (none, int8, nf4, fp4).
        adapter: a peft config, e.g. ``class_path: peft.LoraConfig``; ``None`` trains every weight (full
            fine-tuning, which needs an unquantized base).
        adapter_path: a trained adapter in peft format (a directory with ``adapter_config.json``) to load onto the
            base instead of creating a new one from ``adapter``: to continue training it, or to evaluate it.
        allow_base_mismatch: load an adapter (``adapter_path``) or a checkpoint (``--ckpt_path``) that records another
            base than ``pretrained``; by default that is refused, since adapter weights of matching names and shapes
            load onto another base without any error and compute nonsense.
        prepare_kbit: apply peft's ``prepare_model_for_kbit_training`` to a quantized base: fp32 copies of its
            frozen norms, embeddings and output layer, the QLoRA paper's recipe (``true``). ``auto``, the default,
            does so for a float16 compute dtype only, whose narrow range is what the fp32 copies guard against;
            with bfloat16 the frozen weights stay as loaded, like in any bf16 model: the residual stream stays in
            bf16, with no casts around each quantized layer and each chunk of the fused loss, and half the memory
            for these weights.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30 % more compute):
            ``true`` on every decoder layer; a number: on that many layers only (the first ones), keeping the
            others' activations; ``auto``: every layer, except as many as the memory the fused loss saves can
            hold (:func:`qlit.models.layers.auto_checkpointed`) — speed at no more peak memory than ``true``
            without fused kernels; ``offload``: every layer, with each layer's saved input in pinned host memory
            until the backward pass needs it (:mod:`qlit.models.offload`, Unsloth's trade): the least GPU memory.
        gradient_checkpointing_kwargs: passed to ``torch.utils.checkpoint`` through transformers; ``None`` means
            ``{"use_reentrant": true}``, the variant the QLoRA recipe uses (with input gradients enabled).
        memory_budget: GPU memory training may use, in GiB (``14``) or as a share of the device (``"50%"``): at the
            start of training qlit measures what each decoder layer's activations cost on this model and batch, and
            keeps as many layers as the budget pays for, recomputes the others and offloads recomputed inputs to
            host memory only where recomputation alone does not fit (:mod:`qlit.models.memory_plan`); one line
            says the plan. ``auto``: ``gradient_checkpointing`` decides alone.
        optimizer: optimizer class and its arguments, e.g. ``bitsandbytes.optim.PagedAdamW8bit``.
        lr_scheduler: learning-rate schedule, stepped every optimizer step (e.g. ``qlit.optim.WarmupCosineLR``).
        compile: run each decoder layer through ``torch.compile`` (CUDA): fewer kernel launches and fused
            element-wise work; the first steps pay the compilation. The compiler fuses the norms, rotary embedding
            and gated MLP itself, so of Liger's kernels only the fused loss is applied.
        fused_lora: LoRA over a 4-bit base as one autograd function per projection
            (:mod:`qlit.models.fused_lora`): the adapter's product accumulated into the base output by the matmul,
            without peft's copy, scaling and sum passes. ``auto`` fuses the layers where it computes exactly what
            peft does (plain LoRA, with or without dropout) and leaves the others to peft; ``true`` insists; ``false``
            keeps peft's forward everywhere.
        cuda_graphs: replay each decoder layer that is not checkpointed as a CUDA graph in training
            (:mod:`qlit.models.graphs`): one launch for its forward and one for its backward pass instead of
            hundreds, which is what bounds small models' steps. Packed steps are padded to one fixed shape (samples
            whose labels are ignored), since a graph replays fixed shapes. ``auto`` applies them on one CUDA device,
            without gradient accumulation or ``compile``, to an unquantized or 4-bit base (not 8-bit or BitNet),
            where batches are packed for the variable-length kernel, and runs eagerly anywhere else; ``true`` insists
            (refused where they cannot apply); ``false`` runs every layer eagerly.
        generation: how validation, test, predict and the latency probe generate (:mod:`qlit.generation`):
            ``graphs`` prefills a static KV cache and replays each decoding step as one CUDA graph, with the tokens
            of transformers' greedy ``generate``; ``auto`` does so on one CUDA device for an unquantized or 4-bit base
            and runs ``generate`` anywhere else (said in one line on a GPU); ``eager`` always runs ``generate``.
        max_new_tokens: longest generation in validation, test and predict.
        save_adapter: at the end of ``fit`` save the adapter in peft format (and the tokenizer) under the run's
            log directory, in ``adapter/``.
    """

    def __init__(
        self,
        pretrained: str = "qlit-tiny/qwen2",
        revision: str | None = None,
        trust_remote_code: bool = False,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        attn_implementation: str | None = "auto",
        kernels: KernelChoice = "auto",
        quantization: Quantization = Quantization(),
        adapter: PeftConfig | None = None,
        adapter_path: str | None = None,
        allow_base_mismatch: bool = False,
        prepare_kbit: bool | Literal["auto"] = "auto",
        gradient_checkpointing: bool | int | Literal["auto", "offload"] = False,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
        memory_budget: float | str = "auto",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        fused_lora: bool | Literal["auto"] = "auto",
        cuda_graphs: GraphsChoice = "auto",
        generation: GenerationChoice = "auto",
        max_new_tokens: int = 16,
        save_adapter: bool = True,
    ) -> None:
        super().__init__()
        if max_new_tokens < 1:
            raise QlitError(f"model.max_new_tokens must be 1 or more, got {max_new_tokens}.")
        if gradient_checkpointing not in ("auto", "offload") and not isinstance(gradient_checkpointing, bool):
            if not isinstance(gradient_checkpointing, int) or gradient_checkpointing < 0:
                raise QlitError(
                    "model.gradient_checkpointing must be true, false, auto, offload or a number of layers (0 or "
                    f"more), got {gradient_checkpointing!r}."
                )
        memory_plan.check_budget(memory_budget)
        if memory_budget != "auto":
            if gradient_checkpointing not in (False, "auto"):
                raise QlitError(
                    f"model.memory_budget {memory_budget!r} plans which layers are recomputed, and "
                    f"model.gradient_checkpointing {gradient_checkpointing!r} fixes it: set gradient_checkpointing to "
                    "auto, or memory_budget to auto."
                )
            gradient_checkpointing = "auto"  # the plan decides, layer by layer
        for name, value in (("prepare_kbit", prepare_kbit), ("fused_lora", fused_lora)):
            if not (isinstance(value, bool) or value == "auto"):
                raise QlitError(f"model.{name} must be true, false or auto, got {value!r}.")
        _check_optimizer(optimizer, lr_scheduler)
        # A checkpoint stored quantized (GPTQ, AWQ, bitsandbytes 4-bit) decides the mode, and a quantization block
        # that contradicts it fails here; a hub id's config is read when the model is configured, before its weights.
        quantization = checkpoint_quantization(
            pretrained, quantization, revision=revision, trust_remote_code=trust_remote_code, local_only=True
        )
        if adapter is None and adapter_path is None:
            quantization.backend.check_full_fine_tuning()
        if adapter is not None:
            # Refused pairs fail here, before any weight is loaded.
            check_adapter(adapter, quantization, gradient_checkpointing=gradient_checkpointing)
        self.pretrained = pretrained
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        check_kernels(kernels)
        self.kernels = kernels
        #: The fused kernels actually applied (``liger`` or ``none``), known once the model is loaded.
        self.kernels_applied = "none"
        self.quantization = quantization
        self.adapter = adapter
        self.adapter_path = adapter_path
        self.allow_base_mismatch = allow_base_mismatch
        if adapter_path is not None:
            self.check_base(adapter_base(adapter_path), f"model.adapter_path '{adapter_path}'")
            check_adapter_storage(adapter_path, quantization)
        self.prepare_kbit = prepare_kbit
        self.gradient_checkpointing = gradient_checkpointing
        self.gradient_checkpointing_kwargs = gradient_checkpointing_kwargs
        self.memory_budget = memory_budget
        #: The plan ``memory_budget`` made at the start of training (``None`` without a budget).
        self.memory_plan: memory_plan.MemoryPlan | None = None
        #: Where offloaded layers keep their inputs (``gradient_checkpointing: offload`` or a plan that offloads).
        self.offloader = Offloader()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.compile_layers = compile  # not `self.compile`: that would hide nn.Module.compile()
        check_fused_lora(fused_lora, adapter, quantization.backend.allows_fused_lora)
        self.fused_lora = fused_lora
        every_layer = True if gradient_checkpointing == "offload" else gradient_checkpointing
        check_graphs(cuda_graphs, compile, every_layer, attn_implementation)
        self.cuda_graphs = cuda_graphs
        #: The decoder layers' CUDA graphs, planned at the start of training (``None``: every layer runs eagerly).
        self.graphs: LayerGraphs | None = None
        #: LoRA layers given the fused forward, known once the model is loaded.
        self.fused_lora_layers = 0
        #: Decoder layers recomputed in the backward pass when only some are (``auto`` or a number).
        self.checkpointed_layers: int | None = None
        self.max_new_tokens = max_new_tokens
        #: Greedy generation's path (the recorded decode step, or transformers' generate) and its recorded shapes.
        self.generator = Generator(generation)
        self.save_adapter = save_adapter
        #: How the new adapter started (what saving it needs to know), once the model is loaded.
        self.adapter_start = AdapterStart()
        self.model: Any = None
        self.task: Task = Task()
        self.tokenizer: Any = None
        #: Timing of the latest ``generate`` call, read by the latency callback in ``predict``.
        self.last_generation: dict[str, float] | None = None
        #: Where the end of ``fit`` saved the adapter (or a base in its own format), on rank 0; ``None`` if nowhere.
        self.saved_to: Path | None = None
        self._ranks_updated_at = 0
        # Checkpoints hold only what trains: a frozen (possibly 4-bit) base is reloaded from `pretrained`.
        self.strict_loading = not self.has_adapter
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.val_metrics = MetricCollection({})
        self.test_metrics = MetricCollection({})

    @property
    def upcasts_frozen_weights(self) -> bool:
        """Whether ``prepare_kbit`` (as resolved for the compute dtype) makes fp32 copies of the frozen weights."""
        if self.prepare_kbit == "auto":
            return self.quantization.is_quantized and self.quantization.compute_dtype == "float16"
        return bool(self.prepare_kbit)

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None or self.adapter_path is not None

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        # Read by DistributedDataParallel when it wraps this module (plain DDP), which otherwise broadcasts every
        # parameter from rank 0. The frozen base is the same checkpoint loaded the same way on every rank, so only
        # what trains is sent: that saves sending the whole base, and torchao's quantized weights (tensor subclasses)
        # cannot be sent at all (DDP's broadcast bucket views them flat, an op Int8Tensor does not implement).
        return [name for name, param in self.named_parameters() if not param.requires_grad]

    def study_hparams(self) -> dict[str, Any]:
        """The columns a quantization study compares runs by (TensorBoard's hparams table).

        The ``params`` callback writes them, with its counts, in the run's one hyperparameter record. Not
        save_hyperparameters(): LightningCLI already writes the full config.yaml, and hyper-parameters stored in
        checkpoints would be re-applied to the model's arguments when resuming with --ckpt_path.
        """
        return {
            "pretrained": self.pretrained,
            **self.quantization.study_columns(self.dtype_name),
            "adapter": adapter_name(
                type(self.adapter).__name__ if self.adapter is not None else None,
                vars(self.adapter) if self.adapter is not None else {},
                self.adapter_path,
            ),
            "gradient_checkpointing": self.gradient_checkpointing,
            "memory_budget": self.memory_budget,
        }

    # ----- building the model -------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        quantization = checkpoint_quantization(
            self.pretrained, self.quantization, revision=self.revision, trust_remote_code=self.trust_remote_code
        )
        if quantization != self.quantization:  # a hub checkpoint stored quantized: what the config read could not
            if self.adapter is not None:
                check_adapter(self.adapter, quantization, gradient_checkpointing=self.gradient_checkpointing)
            elif self.adapter_path is None:
                quantization.backend.check_full_fine_tuning()
            self.quantization = quantization
        # A strategy that shards the model (qlit.sharding) may build the base without its weights: shard_module fills
        # each rank's part of them once the model is sharded.
        sharded_base = getattr(self._trainer.strategy, "sharded_base", None) if self._trainer is not None else None
        model = sharded_base(self) if sharded_base is not None else None
        if model is None:
            model = load_causal_lm(
                self.pretrained,
                quantization=self.quantization,
                dtype=self.dtype_name,
                device=device,
                revision=self.revision,
                trust_remote_code=self.trust_remote_code,
                attn_implementation=self._attention(device),
            )
        self.kernels_applied = apply_kernels(model, self.kernels, device, layer_kernels=not self.compile_layers)
        model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
        # from_pretrained returns a model in eval mode and Lightning keeps each submodule's mode as it finds it:
        # left in eval, the decoder layers would skip gradient checkpointing (and dropout) during training.
        model.train()
        self.model = self._attach_adapter(model)
        if self.has_adapter:
            self.fused_lora_layers = apply_fused_lora(self.model, self.fused_lora)
        if self.gradient_checkpointing == "offload":
            self.checkpointed_layers = offload_layers(layers.decoder_layers(self.model), self.offloader)
        elif self.gradient_checkpointing == "auto" and self.memory_budget == "auto":
            fused = self.kernels_applied == "liger"
            fp32_stream = self.quantization.backend.kbit_training and self.upcasts_frozen_weights
            recomputed = layers.auto_checkpointed(self.model, fused, fp32_stream, graphed=self._may_graph(device))
            self.checkpointed_layers = layers.checkpoint_first(self.model, recomputed)
        elif not isinstance(self.gradient_checkpointing, (bool, str)):
            self.checkpointed_layers = layers.checkpoint_first(self.model, self.gradient_checkpointing)
        if self.compile_layers:
            layers.compile_layers(self.model)
        shard_module = getattr(self._trainer.strategy, "shard_module", None) if self._trainer is not None else None
        if shard_module is not None:
            shard_module(self)

    def _may_graph(self, device: torch.device) -> bool:
        """Whether the layers kept from checkpointing may be replayed as CUDA graphs (what the trainer and the data
        decide is known only when training starts)."""
        return (
            self.cuda_graphs is not False
            and recordable(device)
            and not self.compile_layers
            and self.model.config._attn_implementation == attention.VARLEN
        )

    def load_original(self, name: str | None = None) -> Any:
        """The base as its checkpoint stores it (or the model ``name``: the checkpoint a quantized one was made
        from), unquantized, in the dtype the adapted layers compute in, on this module's device and without an
        adapter: what the fidelity callback measures the stored base against. ``None`` for a checkpoint that is
        itself stored quantized when no ``name`` is given (it has no original here)."""
        if name is None and not self.quantization.backend.has_original:
            return None
        model = load_causal_lm(
            name or self.pretrained,
            quantization=Quantization(mode="none"),
            dtype=self.quantization.training_dtype(self.dtype_name) or self.dtype_name,
            device=self.device,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            attn_implementation=self._attention(self.device),
        )
        return model.eval()

    def _attention(self, device: torch.device) -> str | None:
        if self.attn_implementation == attention.VARLEN:
            return attention.register()
        if self.attn_implementation != "auto":
            return self.attn_implementation
        # Padded batches (validation, generation) go through SDPA inside the varlen implementation too.
        return attention.register() if attention.varlen_available(device) else "sdpa"

    def _attention_dropout(self) -> float:
        from qlit.models.loading import load_config

        config = load_config(self.pretrained, revision=self.revision, trust_remote_code=self.trust_remote_code)
        return attention.attention_dropout(config)

    def _attach_adapter(self, model: Any) -> Any:
        from peft import prepare_model_for_kbit_training

        ckpt_kwargs = dict(self.gradient_checkpointing_kwargs or {"use_reentrant": True})
        backend = self.quantization.backend
        backend.convert(model, has_adapter=self.has_adapter)
        if backend.kbit_training and self.upcasts_frozen_weights:
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=self.gradient_checkpointing,
                gradient_checkpointing_kwargs=ckpt_kwargs,
            )
        elif self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
            if self.has_adapter:
                # Reentrant checkpointing only back-propagates into a segment whose inputs require grad; with a
                # frozen embedding they would not, and the adapters inside would get no gradient.
                model.enable_input_require_grads()
        if self.adapter_path is not None:
            return self._load_adapter(model)
        if self.adapter is None:
            return model
        model, self.adapter_start = start_adapter(
            model,
            backend.adapter_config(self.adapter, model),
            backend,
            pretrained=self.pretrained,
            revision=self.revision,
            calibration=self._calibration,
        )
        return model

    def _load_adapter(self, model: Any) -> Any:
        adapter_base(self.adapter_path)  # still there, and still an adapter
        return load_adapter(model, self.adapter_path, self.pretrained)

    def _calibration(self) -> Calibration | None:
        """The DataModule's training data, for an adapter whose start is computed from activations (EVA, CorDA);
        ``None`` without a DataModule."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return None
        try:
            loader = datamodule.train_dataloader()
        except QlitError:  # qlit validate and test set up their own split alone
            datamodule.setup("fit")
            loader = datamodule.train_dataloader()
        device = self.trainer.strategy.root_device

        def forward(model: Any, batch: Any) -> Any:
            batch = self.transfer_batch_to_device(batch, device, 0)
            with self.trainer.precision_plugin.forward_context():
                return self(batch, model=model)

        return Calibration(loader, forward)

    def check_base(self, trained_on: str | None, what: str) -> None:
        """Refuse weights recorded as trained on another base than ``pretrained`` (unless ``allow_base_mismatch``).

        Args:
            trained_on: the recorded base (``None``: nothing recorded, nothing to check).
            what: the weights, as the sentence names them (``checkpoint 'last.ckpt'``).
        """
        if trained_on is None or self.allow_base_mismatch or same_base(trained_on, self.pretrained):
            return
        raise QlitError(
            f"{what} was trained on base '{trained_on}', but model.pretrained is '{self.pretrained}': set "
            f"model.init_args.pretrained to '{trained_on}', or set model.init_args.allow_base_mismatch: true to load "
            "it onto this base anyway."
        )

    def check_checkpoint_base(self, checkpoint: dict[str, Any], path: str | Path | None = None) -> None:
        """:meth:`check_base` for a Lightning checkpoint: its own record, else its run's ``config.yaml``."""
        recorded = checkpoint.get(CHECKPOINT_BASE_KEY)
        trained_on = recorded.get("pretrained") if isinstance(recorded, dict) else None
        if trained_on is None and path is not None:
            trained_on = _run_config_base(Path(path))
        self.check_base(trained_on, f"checkpoint '{path}'" if path is not None else "the checkpoint")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        if hasattr(datamodule, "packing_default"):
            # Prompt learning prepends virtual tokens to every row: a packed row would share one set among samples.
            prompt_learning = getattr(self.adapter, "is_prompt_learning", False)
            if prompt_learning and datamodule.packing:
                raise QlitError(
                    f"data.packing cannot train {type(self.adapter).__name__}, which prepends virtual tokens to every "
                    "row: set data.packing: false."
                )
            # Packing pays where the variable-length kernel runs; elsewhere a packed row's attention is a dense
            # (tokens × tokens) mask, slower than padded rows (twice the demo's time on two CPU cores).
            varlen = self._attention(self.trainer.strategy.root_device) == attention.VARLEN
            # Nor where the model trains with attention dropout, which the kernel lacks (GPT-2): the packed row
            # would go through the dense mask.
            datamodule.packing_default = varlen and not prompt_learning and not self._attention_dropout()
        self.task = getattr(datamodule, "task", Task())
        self.tokenizer = getattr(datamodule, "tokenizer", None)
        # Submodules built here are moved to the device with the rest of the module by the strategy.
        self.val_metrics = self.task.metrics().clone(prefix="val/")
        self.test_metrics = self.task.metrics().clone(prefix="test/")

    # ----- steps ----------------------------------------------------------------------------------------------------
    def forward(self, batch: Batch, model: Any = None) -> Any:
        """The wrapped model's output (loss and logits) on ``batch``; ``model``: another model fed the same way (the
        fidelity callback's unquantized original)."""
        if model is None:
            model = self.model
        if "cu_seq_lens" in batch:
            # A packed row: the restarting position ids let transformers' SDPA path build its per-sample mask, and
            # the sample bounds (flash-attention's keyword names) let the variable-length kernel skip any mask.
            if self.graphs is not None and self.training and torch.is_grad_enabled() and model is self.model:
                batch = self.graphs.arm(batch)  # padded to the graphs' fixed shape
            bounds, longest = batch["cu_seq_lens"], batch["max_length"]
            return model(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                labels=batch["labels"],
                cu_seq_lens_q=bounds,
                cu_seq_lens_k=bounds,
                max_length_q=longest,
                max_length_k=longest,
                return_dict=True,
            )
        # return_dict named: a forward that falls back to config.use_return_dict (Liger's fused-loss forwards do)
        # reads a property transformers 5 deprecates, with a warning.
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            return_dict=True,
        )

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            # Each rank's loss is the mean over its own answer tokens: weighted by the rank's share of the global
            # batch's tokens, the ranks' averaged gradient is the one of the mean over every token of the global
            # batch, as one process computes it (not a mean of per-rank means, which weights a rank with fewer
            # tokens more). Logged as the mean over the ranks: the global batch's loss.
            tokens = (batch["labels"][..., 1:] != IGNORE_INDEX).sum().to(loss.dtype)
            total = self.trainer.strategy.reduce(tokens.detach().clone(), reduce_op="sum")
            loss = loss * tokens * world / total.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True, batch_size=samples_in(batch), sync_dist=world > 1)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, self.val_loss, self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, self.test_loss, self.test_metrics)

    def _eval_step(self, batch: dict[str, Any], loss_metric: MeanMetric, metrics: MetricCollection) -> dict[str, Any]:
        out = self(batch)
        # Token-weighted, so the epoch loss is the mean over every answer token, as perplexity is defined.
        loss_metric.update(out.loss.detach().float(), weight=(batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        # The latency callback times a fixed probe of its own: the task's generations (its rows, its lengths) are not
        # comparable across tasks and techniques.
        self.task.update(metrics, batch, out.logits, lambda b: self.generate(b)[0])
        return {"loss": out.loss.detach()}

    def on_validation_epoch_start(self) -> None:
        self.task.start_pass(self)  # generate_val_samples: auto plans its rows here

    def on_test_epoch_start(self) -> None:
        self.task.start_pass(self)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_loss, self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_loss, self.test_metrics)

    def _log_epoch(self, prefix: str, loss_metric: MeanMetric, metrics: MetricCollection) -> None:
        self.generator.release()  # after the latency probe (callbacks' epoch ends come first): training needs none
        if loss_metric.update_count == 0:
            return
        loss = loss_metric.compute()
        self.log(f"{prefix}/loss", loss, prog_bar=True)
        self.log(f"{prefix}/perplexity", torch.exp(loss.clamp(max=math.log(1e8))))
        loss_metric.reset()
        if len(metrics):
            self.log_dict(metrics.compute(), prog_bar=True)
            metrics.reset()
        self.task.epoch_end(self, prefix)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        texts, _ = self.generate(batch)
        prompts = self._tokenizer().batch_decode(batch["prompt_input_ids"], skip_special_tokens=False)
        pad = self._tokenizer().pad_token
        return [
            {
                "prompt": p.replace(pad, "") if pad else p,
                "generation": t,
                "prediction": self.task.parse(t),
                "reference": r,
            }
            for p, t, r in zip(prompts, texts, batch["reference"], strict=True)
        ]

    # ----- generation -------------------------------------------------------------------------------------------------
    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise QlitError("generation needs the DataModule's tokenizer: run with a data section.")
        return self.tokenizer

    @torch.no_grad()
    def generate(self, batch: dict[str, Any]) -> tuple[list[str], dict[str, float]]:
        """Greedy continuations of the batch's prompts, and their timing for the latency callback."""
        tok = self._tokenizer()
        out = self.generate_ids(batch["prompt_input_ids"], batch["prompt_attention_mask"], self.max_new_tokens)
        texts = tok.batch_decode(out.tokens, skip_special_tokens=True)
        self.last_generation = {
            "seconds": out.seconds,
            "samples": out.tokens.size(0),
            "new_tokens": out.new_tokens(tok.eos_token_id),
            "prefill_seconds": out.prefill_seconds,
            "decode_seconds": out.decode_seconds,
            "decode_steps": out.decode_steps,
        }
        return texts, self.last_generation

    def generate_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **options: Any
    ) -> Generated:
        """Greedy new ids for left-padded prompts through :attr:`generator` (``options``: ``min_new_tokens``,
        ``cache_length`` of :meth:`Generator.generate`), stopping at the tokenizer's end-of-sequence id."""
        tok = self._tokenizer()
        return self.generator.generate(
            self.model,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            allows_graphs=self.quantization.backend.allows_cuda_graphs,
            **options,
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # AdaLoRA re-allocates ranks after every optimizer step, from the gradients of that step: here they are
        # still present (Lightning clears them at the start of the next step). Skipped between accumulated batches.
        update = getattr(getattr(self.model, "base_model", None), "update_and_allocate", None)
        if update is not None and self.global_step != self._ranks_updated_at:
            self._ranks_updated_at = self.global_step
            update(self.global_step)

    # ----- optimization ---------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise QlitError("nothing to train: the model has no trainable parameters.")
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        # A schedule without its length gets the trainer's estimate at on_train_start, not here: under max_epochs the
        # estimate sets up the training loader, whose iterator Lightning then creates before a checkpoint's position
        # in the epoch is restored, so a run resumed mid-epoch would replay the epoch from its first batch.
        self._planned_schedule = _schedule_plan(scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        self._replan_schedule()
        self._plan_memory()
        self._plan_graphs()

    def _plan_memory(self) -> None:
        """``memory_budget``: measure the layers' costs on this model, then keep, recompute or offload each layer."""
        budget = memory_plan.budget_bytes(self.memory_budget, self.device)
        decoder = layers.decoder_layers(self.model)
        if budget is None or not decoder or self.memory_plan is not None:
            return
        static = memory_plan.static_bytes(self.model, self.device)
        costs = memory_plan.measure(self.model, decoder, self._probe_loss)
        graph_per_token = 0.0
        if self._may_graph(self.device):
            config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else None
            hidden = int(getattr(config or self.model.config, "hidden_size", 0) or 0)
            fp32_stream = self.quantization.backend.kbit_training and self.upcasts_frozen_weights
            graph_per_token = layers.GRAPH_BUFFERS * (4 if fp32_stream else 2) * hidden
        plan = memory_plan.plan(budget, static, self._tokens_per_step(), len(decoder), costs, graph_per_token)
        offload_layers(decoder[: plan.offloaded], self.offloader)
        for i, layer in enumerate(decoder[plan.offloaded :]):
            layer.gradient_checkpointing = i < plan.recomputed
        self.memory_plan = plan
        self.checkpointed_layers = plan.recomputed + plan.offloaded
        rank_zero_info(plan.line())

    def _tokens_per_step(self) -> int:
        """The most tokens one training batch holds: the packing budget, or rows × the longest row."""
        from qlit.data.batching import TokenBudgetBatchSampler

        loader = self.trainer.train_dataloader
        for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
            if isinstance(sampler, TokenBudgetBatchSampler):
                return sampler.max_tokens
        longest = getattr(self.trainer.datamodule, "max_length", None) if self.trainer.datamodule else None
        if longest is None:
            longest = max((len(row["input_ids"]) for row in getattr(loader, "dataset", ())), default=1)
        return int(getattr(loader, "batch_size", None) or 1) * int(longest)

    def _probe_loss(self, tokens: int) -> torch.Tensor:
        """The loss of one batch of ``tokens`` random tokens, collated as training collates (what the plan measures)."""
        from qlit.data.batching import PackingCollator

        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else None
        vocab = int((config or self.model.config).vocab_size)
        ids = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        collate = getattr(self.trainer.train_dataloader, "collate_fn", None) or PackingCollator()
        batch = collate([{"input_ids": ids, "labels": ids, "prompt_length": 0}])
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with self.trainer.precision_plugin.forward_context():
            return self(batch).loss

    @property
    def graph_held_bytes(self) -> int:
        """GPU memory the layers' CUDA graphs hold beyond the allocator's allocated count (0 without graphs)."""
        return self.graphs.held_bytes if self.graphs is not None else 0

    def _plan_graphs(self) -> None:
        if self.cuda_graphs is False or self.graphs is not None:
            return
        from lightning.pytorch.strategies import SingleDeviceStrategy

        from qlit.data.batching import PackingCollator, TokenBudgetBatchSampler

        trainer = self.trainer
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        kept = graphable_layers(self.model)
        reasons = [
            reason
            for reason, holds in (
                ("a CUDA device", recordable(self.device)),
                ("one device without a distributed strategy", isinstance(trainer.strategy, SingleDeviceStrategy)),
                ("no gradient accumulation (trainer.accumulate_grad_batches: 1)", trainer.accumulate_grad_batches == 1),
                ("model.compile: false", not self.compile_layers),
                # The quantization backend says (LLM.int8()'s outlier split and BitNet's layers are not recorded).
                ("an unquantized or 4-bit base", self.quantization.backend.allows_cuda_graphs),
                ("a decoder layer that is not checkpointed", bool(kept)),
                (
                    "packed batches through the variable-length kernel (data.packing)",
                    isinstance(getattr(loader, "collate_fn", None), PackingCollator)
                    and self.model.config._attn_implementation == attention.VARLEN,
                ),
            )
            if not holds
        ]
        if reasons:
            if self.cuda_graphs is True:
                raise QlitError(f"model.cuda_graphs: true needs {'; '.join(reasons)}: set it to auto or false.")
            if recordable(self.device):  # on a GPU, say why the default's speed-up is not there
                rank_zero_info(
                    f"CUDA graphs off for this run (they need {'; '.join(reasons)}); its layers run eagerly."
                )
            return
        tokens = samples = longest = None
        if isinstance(sampler, TokenBudgetBatchSampler):
            tokens = sampler.max_tokens
            longest = min(max(sampler.lengths, default=tokens), tokens)
            # Room for twice the most samples a batch of this epoch holds (later epochs shuffle).
            samples = 2 * max((len(batch) for batch in sampler.plan()), default=1)
        self.graphs = LayerGraphs(
            kept, tokens=tokens, samples=samples, longest=longest, insist=self.cuda_graphs is True
        )

    def _replan_schedule(self) -> None:
        # A checkpoint restores the whole scheduler, its length included: a finished run resumed to train longer
        # would sit at the end of its old schedule (learning rate 0 after a cosine decay to 0) for every new step.
        # This run's plan wins; the step counter stays the checkpoint's.
        plan = getattr(self, "_planned_schedule", None)
        configs = self.trainer.lr_scheduler_configs
        if not plan or not configs:
            return
        scheduler = configs[0].scheduler
        if plan["total_steps"] is None:  # here, after the restore: see configure_optimizers
            steps = self.trainer.estimated_stepping_batches
            if not math.isfinite(steps):
                raise QlitError(
                    "The learning-rate schedule needs the fit's length, but the fit has no end: set "
                    "trainer.max_steps or trainer.max_epochs, or the scheduler's total_steps."
                )
            plan["total_steps"] = int(steps)
        if scheduler.total_steps is None:  # not restored from a checkpoint: this run's own schedule, from step 0
            scheduler.total_steps = plan["total_steps"]
        stored = _schedule_plan(scheduler)
        if stored == plan:
            return
        for key, value in plan.items():
            setattr(scheduler, key, value)
        # The optimizer holds the rate of the next step, restored from the old plan: recompute it under the new one.
        lrs = [
            base * factor(scheduler.last_epoch)
            for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
        ]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs
        changes = ", ".join(f"{key} {stored[key]} -> {plan[key]}" for key in plan if stored[key] != plan[key])
        rank_zero_info(
            f"Resuming at step {self.global_step}: the learning-rate schedule is re-planned for this run ({changes})."
        )

    # ----- checkpoints and adapters ---------------------------------------------------------------------------------
    def _trainable_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_BASE_KEY] = self.base_spec()
        if not self.has_adapter:
            return
        keep = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        self.check_checkpoint_base(checkpoint, path)
        name = f"checkpoint '{path}'" if path is not None else "the checkpoint"
        params = dict(self.named_parameters())
        for key, value in checkpoint["state_dict"].items():
            if key in params and isinstance(value, torch.Tensor) and value.shape != params[key].shape:
                raise QlitError(
                    f"{name} holds '{key}' of shape {tuple(value.shape)}, but this model's is "
                    f"{tuple(params[key].shape)}: it was written by a run with another adapter or model."
                )
        if not self.has_adapter:
            return
        missing = sorted(self._trainable_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise QlitError(
                f"{name} does not hold this adapter's weights (e.g. '{missing[0]}'): it was written by a run "
                "with another adapter or model."
            )

    def on_fit_end(self) -> None:
        # Every rank asks for the run directory, since trainer.log_dir is a broadcast from rank 0: asked from rank 0
        # alone (inside a rank-zero-only method) it waits for ranks that never join. Then rank 0 alone writes.
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        adapter_saved = self.save_adapter and self.has_adapter
        if adapter_saved:
            # A strategy that shards the model gathers the adapter's weights onto rank 0 first (every rank takes part).
            gather = getattr(self.trainer.strategy, "gathered_state_dict", None)
            self._save_adapter(log_dir, gather(self.model) if gather is not None else None)
        self._save_trained(log_dir, adapter_saved)

    @rank_zero_only
    def _save_trained(self, log_dir: Path, adapter_saved: bool) -> None:
        # A base with a format of its own (BitNet's packed ternary weights, QAT's converted one) is saved in it,
        # beside its tokenizer.
        done = self.quantization.backend.finish_fit(
            self.model, log_dir, adapter_saved=adapter_saved, validation_loss=self.validation_loss
        )
        if done.metrics:
            for logger in self.trainer.loggers:
                logger.log_metrics(dict(done.metrics), step=self.global_step)
        if done.line:
            rank_zero_info(done.line)
        if done.saved_to is None:
            return
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(done.saved_to))
        if not adapter_saved:  # else the adapter is what the fit trained, and its record names the base
            self.saved_to = done.saved_to
        log.info("trained model saved to %s", done.saved_to)

    @torch.no_grad()
    def validation_loss(self, model: Any = None) -> float | None:
        """The token-weighted loss of ``model`` (default: the trained one) over the DataModule's validation data,
        fed as the trained model is; ``None`` without validation data."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return None
        loader = datamodule.val_dataloader()
        if isinstance(getattr(loader, "sampler", None), DistributedSampler):
            # Under several processes the loader holds this rank's share of the rows; the end of fit measures on
            # rank 0 alone, so it reads every row, in the split's order, as one process does.
            loader = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
        was_training = self.training
        self.eval()
        total = tokens = 0.0
        try:
            for batch in loader:
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                n = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                total += float(self(batch, model=model).loss) * n
                tokens += n
        finally:
            self.train(was_training)
        return total / tokens if tokens else None

    @rank_zero_only
    def _save_adapter(self, log_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        target = log_dir / "adapter"
        self.save_adapter_to(target, state_dict)
        self.saved_to = target
        log.info("adapter saved to %s", target)

    def save_adapter_to(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the adapter in peft format (``adapter_config.json``, ``adapter_model.safetensors``) and tokenizer;
        ``state_dict``: the adapter's weights gathered whole, where the model holds only this rank's shard of them."""
        directory = Path(directory)
        self.adapter_start.save(self.model, directory, state_dict)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))
        # How the base was stored while the adapter trained: `qlit export` rebuilds exactly that base to merge into.
        (directory / QLIT_BASE_FILE).write_text(json.dumps(self.base_spec(), indent=2))

    def base_spec(self) -> dict[str, Any]:
        """What a merge needs to rebuild the base the adapter was trained on."""
        return {
            "pretrained": self.pretrained,
            "revision": self.revision,
            "dtype": self.dtype_name,
            "quantization": dataclasses.asdict(self.quantization),
        }


def _schedule_plan(scheduler: Any) -> dict[str, Any]:
    """What a schedule's shape depends on besides its step counter (empty: a schedule qlit does not re-plan)."""
    if not isinstance(scheduler, WarmupCosineLR):
        return {}
    return {key: getattr(scheduler, key) for key in ("total_steps", "warmup_steps", "min_lr_ratio")}


def _check_optimizer(optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None) -> None:
    """Build the optimizer and its schedule once on a throwaway parameter, so that arguments they refuse (a negative
    learning rate, betas outside [0, 1)) fail when the config is read, not after the model has loaded."""
    try:
        probe = optimizer([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise QlitError(f"model.optimizer refuses its arguments: {str(err).strip().splitlines()[0]}.") from None
    if lr_scheduler is None:
        return
    try:
        lr_scheduler(probe)
    except (ValueError, TypeError) as err:
        raise QlitError(f"model.lr_scheduler refuses its arguments: {str(err).strip().splitlines()[0]}.") from None


def _run_config_base(checkpoint: Path) -> str | None:
    """The base named by the ``config.yaml`` of the run that wrote ``checkpoint`` (``<run>/checkpoints/x.ckpt``):
    the record of checkpoints written before they held their own."""
    import yaml

    config = checkpoint.parent.parent / "config.yaml"
    if checkpoint.parent.name != "checkpoints" or not config.is_file():
        return None
    try:
        model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        return None
    init = model.get("init_args", model) if isinstance(model, dict) else {}
    pretrained = init.get("pretrained") if isinstance(init, dict) else None
    return pretrained if isinstance(pretrained, str) else None
