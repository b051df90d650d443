"""`modules_to_save`: PEFT's trainable full copies of whole modules beside the LoRA adapters.

What PEFT 0.21.2 allocates (read from the installed code, checked on the CPU ledger):
- `peft/utils/other.py::ModulesToSaveWrapper.update`: `copy.deepcopy(original_module)` in the
  module's dtype as it is at `get_peft_model` time (the load dtype; fp32 after
  `prepare_model_for_kbit_training`). The original stays, frozen. PEFT's
  `tuners_utils.py::cast_adapter_dtype` (autocast_adapter_dtype=True) only walks
  `BaseTunerLayer`s, and the wrapper is none: the copy is NOT upcast to fp32 (ledger: a bf16
  copy of a bf16 base). TRL 1.16's `SFTTrainer.__init__` casts every trainable parameter of a
  quantized base to bf16, the copies too.
- Tied embeddings (qwen2, gpt2): without `ensure_weight_tying=True` each named module gets its
  own deepcopy, so `embed_tokens` and `lm_head` become two separate V x H tensors (ledger).
- A quantized base keeps `embed_tokens` and `lm_head` unquantized (transformers skips the output
  layer; embeddings are no nn.Linear), so their copies are float tensors too.
- Matching is `key.endswith(name)` (`_set_trainable`): a name like `norm` would catch every
  norm of every layer. memplan models the copies of the input embeddings and the output head,
  and refuses other names rather than guess.
Consequences for one step (checked on the ledger, tiny llama / qwen2, torch 2.13):
- the copies, their gradients and optimizer states, in the copy dtype (torch AdamW keeps
  states in the parameter's dtype: a bf16 copy has bf16 Adam states);
- a copied input embedding makes layer 0's input require grad (as `enable_input_require_grads`
  does), so its first norm saves its input: `input_grad` below;
- a copied head saves its input (the final norm's output) for its weight gradient, and its
  V x H weight gradient exists from the loss backward on, through the layers' backward;
- the optimizer step's per-tensor temporaries (memplan.training.optim.step_temporaries).
`trainable_token_indices` (`tuners/trainable_tokens/layer.py::TrainableTokensLayer`) is not
modelled here: it trains k rows (`trainable_tokens_delta`, k x H, plus a k x H copy of the
originals, both upcast to fp32 by `cast_adapter_dtype`) and rebuilds a full V x H embedding with
`index_copy` in every forward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from memplan.errors import SetupError
from memplan.model.spec import ModelSpec
from memplan.model.storage import FLOAT_BYTES, is_quantized
from memplan.training.optim import MIN_8BIT_SIZE, QMAP_BYTES, OptimizerBytes, optimizer_bytes
from memplan.training.setup import Setup

__all__ = ["SavedCopies", "saved_copies", "copies_dtype", "add_saved_copies"]


@dataclass(frozen=True)
class SavedCopies:
    """The trainable copies of one setup: one entry per trainable tensor (weight, bias)."""

    names: tuple[str, ...]
    numels: tuple[int, ...]
    dtype: str
    embedding_numel: int  # numel of the copied input embeddings (their gradients come last)
    head_numel: int  # numel of the copied output head (weight and bias)

    @property
    def itemsize(self) -> int:
        return FLOAT_BYTES[self.dtype]

    @property
    def parameters(self) -> int:
        return sum(self.numels)

    @property
    def weight_bytes(self) -> int:
        return self.parameters * self.itemsize

    @property
    def gradient_bytes(self) -> int:
        """Gradients take the parameter's dtype (autograd accumulates into `p.grad`)."""
        return self.weight_bytes

    @property
    def input_grad(self) -> bool:
        """A trainable input embedding: layer 0's input requires grad."""
        return self.embedding_numel > 0

    def optimizer(self, setup: Setup) -> OptimizerBytes:
        return optimizer_bytes(setup.optimizer, list(self.numels), self.itemsize, device=setup.device)

    def step_temporaries(self, setup: Setup) -> int:
        """Optimizer-step temporaries of the copies alone, as estimate's `opt_temp` counts them
        (torch/optim/adamw.py): the CUDA foreach path's `_foreach_sqrt(exp_avg_sq)` list adds
        one state's bytes per tensor; the CPU single-tensor path holds 2 x the largest embedding
        or head tensor (the CPU ledger measurement estimate.py cites)."""
        if setup.optimizer != "adamw" or not self.numels:
            return 0
        if setup.device == "cuda":
            return self.weight_bytes
        return 2 * max(self.numels) * self.itemsize


def copies_dtype(setup: Setup) -> str:
    """dtype of the copies: the module's dtype at `get_peft_model` time, bf16 after SFTTrainer's cast."""
    if setup.recipe == "trl-sft" and is_quantized(setup.quant):
        return "bf16"  # trl/trainer/sft_trainer.py::SFTTrainer.__init__ (quantized base)
    if setup.prepare_kbit_training:
        return "fp32"  # peft/utils/other.py::prepare_model_for_kbit_training upcasts them first
    return setup.param_dtype


def saved_copies(spec: ModelSpec, setup: Setup) -> SavedCopies:
    """The copies `setup.modules_to_save` asks for; a name memplan does not model is refused."""
    names = tuple(setup.modules_to_save or ())
    dtype = copies_dtype(setup)
    if not names or setup.method != "lora":
        return SavedCopies((), (), dtype, 0, 0)
    embeddings = {t.name: t for t in spec.tensors if t.component == "embeddings" and t.count == 1}
    heads = {lin.name: lin for lin in spec.linears if lin.is_output}
    numels: list[int] = []
    embedding = head = 0
    for name in names:
        if name in embeddings:
            numels.append(embeddings[name].numel)
            embedding += embeddings[name].numel
        elif name in heads:
            lin = heads[name]
            per = [lin.weight_numel] + ([lin.out_features] if lin.bias else [])
            numels += per
            head += sum(per)
        else:
            known = ", ".join([*embeddings, *heads])
            raise SetupError(f"--modules-to-save {name}: memplan models the copies of {spec.name}'s input embeddings and "
                             f"output head ({known}); PEFT matches other names as suffixes of every layer's modules")
    return SavedCopies(names, tuple(numels), dtype, embedding, head)


def add_saved_copies(fixed: Any, spec: ModelSpec, setup: Setup) -> Any:
    """estimate.py's `_Fixed` (the setup's step-independent parts) with the copies added, by
    `dataclasses.replace`; typed `Any` because estimate.py imports this module, not the reverse."""
    c = saved_copies(spec, setup)
    if not c.numels:
        return fixed
    opt = c.optimizer(setup)
    if setup.optimizer.endswith("8bit") and any(n >= MIN_8BIT_SIZE for n in fixed.numels):
        opt = OptimizerBytes(opt.resident - QMAP_BYTES, opt.paged)  # bnb's two qmaps are shared, counted once
    temp = c.step_temporaries(setup)
    return replace(
        fixed,
        numels=tuple(fixed.numels) + c.numels,
        trainable_parameters=fixed.trainable_parameters + c.parameters,
        adapters=fixed.adapters + c.weight_bytes,
        gradients=fixed.gradients + c.gradient_bytes,
        optimizer=OptimizerBytes(fixed.optimizer.resident + opt.resident, fixed.optimizer.paged + opt.paged),
        # CUDA foreach: one list over every tensor (a sum); CPU: per tensor (the largest).
        opt_temp=fixed.opt_temp + temp if setup.device == "cuda" else max(fixed.opt_temp, temp),
        # The head copy's weight gradient exists through the layers' backward; the embedding's
        # comes last (after layer 0), so layer 0's backward sees every gradient but that one.
        head_grad=fixed.head_grad + c.head_numel * c.itemsize,
        first_layer_grads=fixed.first_layer_grads + (c.parameters - c.embedding_numel) * c.itemsize,
    )
