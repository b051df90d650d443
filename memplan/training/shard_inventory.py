"""Every parameter tensor as a sharding library sees it: which wrapped unit holds it, its numel in
its storage dtype, its first dimension, its element size and whether it trains.

FSDP and ZeRO shard storage elements, not model parameters: a bitsandbytes 4-bit weight with a float
`bnb_4bit_quant_storage` is a `(ceil(n/2) / itemsize, 1)` tensor of that float dtype
(`bitsandbytes/functional.py::quantize_4bit`, `quant_storage` argument), so FSDP shards its packed
bytes. The quant state (absmax, code tables) is not a parameter and stays whole on every rank
(bitsandbytes `docs/source/fsdp_qlora.md`).

Units follow the wrap policies accelerate builds for Trainer:
- every decoder layer is one unit (`transformer_auto_wrap_policy` on `model._no_split_modules`;
  `fully_shard` per layer for FSDP2), and the root unit holds what is left (embeddings, final norm,
  lm_head);
- under LoRA with FSDP1, PEFT's `peft/utils/other.py::fsdp_auto_wrap_policy` also wraps every leaf
  module with a trainable weight (each `lora_A.default` / `lora_B.default` Linear) as a unit of its
  own, so every FlatParameter has one dtype and one `requires_grad`.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.model.lora import LoraPlan
from memplan.model.spec import ModelSpec
from memplan.model.storage import FLOAT_BYTES, QUANT_STORAGE_BYTES, is_quantized, is_quantized_linear, linear_quantized_bytes

__all__ = ["ParamEntry", "layer_split", "parameter_inventory"]


@dataclass(frozen=True)
class ParamEntry:
    """`count` identical parameter tensors; `per_layer` ones repeat in every decoder layer
    (`count` is then per layer), the others live in the root unit."""

    name: str
    numel: int  # elements of its storage dtype
    dim0: int  # FSDP2 and ZeRO-3 pad the first dimension / the flat numel to the shard count
    itemsize: int
    trainable: bool
    lora: bool
    count: int
    per_layer: bool
    output: bool = False  # the model's output head (lm_head / MLM decoder, `Linear.is_output`), or the table tied to it
    tied: bool = False  # the input embedding's table, shared with a tied output head

    @property
    def bytes(self) -> int:
        return self.numel * self.itemsize * self.count


def layer_split(count: int, layers: int, path: str, component: str) -> tuple[int, bool]:
    """(instances per layer, True) for a tensor repeated in every decoder layer, else (count, False).
    A decoder layer's tensors have `{i}` in their module path; embeddings and heads never repeat, and a
    tensor that appears once belongs to the root even in a one-layer model."""
    if component in ("embeddings", "lm_head", "head") or not layers or count % layers:
        return count, False
    if "{i}" in path or (count > 1 and layers > 1):
        return count // layers, True
    return count, False


def parameter_inventory(spec: ModelSpec, *, quant: str, double_quant: bool, param_dtype: str, quant_storage: str,
                        plan: LoraPlan | None, adapter_itemsize: int) -> tuple[ParamEntry, ...]:
    """Every parameter of the (PEFT-wrapped) model. Frozen under LoRA, all trainable for full fine-tuning."""
    float_size = FLOAT_BYTES[param_dtype]
    full = plan is None
    out: list[ParamEntry] = []
    for lin in spec.linears:
        per, per_layer = layer_split(lin.count, spec.num_layers, lin.path, lin.component)
        if is_quantized(quant) and is_quantized_linear(lin):
            packed, _state = linear_quantized_bytes(lin, quant, double_quant=double_quant)
            size = QUANT_STORAGE_BYTES[quant_storage] if quant != "int8" else 1
            numel = -(-packed // size)
            out.append(ParamEntry(lin.name + ".weight", numel, numel, size, False, False, per, per_layer))
        elif not lin.tied:
            out.append(ParamEntry(lin.name + ".weight", lin.weight_numel, lin.out_features, float_size, full, False, per, per_layer,
                                  output=lin.is_output))
        if lin.bias:
            out.append(ParamEntry(lin.name + ".bias", lin.out_features, lin.out_features, float_size, full, False, per, per_layer))
    # A tied output head shares the input embedding's table: that table is the output head too.
    tied_table = spec.tied_table
    for t in spec.tensors:
        per, per_layer = layer_split(t.count, spec.num_layers, t.path, t.component)
        # An embedding table's first dimension is the vocabulary; a norm's is its width; fused
        # experts are (experts, ...). memplan keeps no shapes for tensors, so the first dimension
        # is the hidden size where it divides the numel (the row count of a table), else the numel.
        dim0 = t.numel // spec.hidden_size if t.numel % spec.hidden_size == 0 and t.numel > spec.hidden_size else t.numel
        table_head = t is tied_table
        out.append(ParamEntry(t.name, t.numel, dim0, float_size, full, False, per, per_layer, output=table_head, tied=table_head))
    if plan is not None:
        for lin in plan.targets:
            per, per_layer = layer_split(lin.count, spec.num_layers, lin.path, lin.component)
            out.append(ParamEntry(lin.name + ".lora_A", plan.rank * lin.in_features, plan.rank, adapter_itemsize, True, True, per, per_layer))
            out.append(ParamEntry(lin.name + ".lora_B", lin.out_features * plan.rank, lin.out_features, adapter_itemsize, True, True, per, per_layer))
        for p in plan.param_targets:
            per, per_layer = layer_split(p.count, spec.num_layers, p.path, "experts")
            r = p.adapter_rank(plan.rank)
            out.append(ParamEntry(p.name + ".lora_A", r * p.in_features, r, adapter_itemsize, True, True, per, per_layer))
            out.append(ParamEntry(p.name + ".lora_B", p.out_features * r, p.out_features, adapter_itemsize, True, True, per, per_layer))
    return tuple(out)
