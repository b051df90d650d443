"""Profile a real `transformers.Trainer` / TRL `SFTTrainer` run under the CPU ledger.

`--recipe trainer|trl-sft`: the model is loaded as in `run.py` (build.load_model: random
checkpoint, `from_pretrained` with BitsAndBytesConfig), then handed to the trainer
unprepared, as a user's script does: Trainer gets the PEFT model (memplan applies LoRA
the way `build.apply_training_setup` does, minus checkpointing, which Trainer turns on
from `gradient_checkpointing=True`); SFTTrainer gets the bare model and a `LoraConfig`
and does the rest itself (get_peft_model, enable_input_require_grads, the bf16 cast of
adapters on quantized bases, the fused LM head).

The data is a tiny in-memory random-token `datasets.Dataset`; the tokenizer is a
word-level one built here (no hub access). `max_steps=steps`, `report_to=[]`,
`save_strategy="no"`, `use_cpu=True`.

The ledger's phases are those of `run.py` (`forward`, `backward`, `optimizer`, then
`step{k}_...`): `compute_loss` is the forward, the rest of `training_step` the backward,
and a `TrainerCallback` closes the optimizer phase in `on_step_end` (after
`optimizer.step()`, `lr_scheduler.step()` and `model.zero_grad()`; transformers
`trainer.py::Trainer._inner_training_loop`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from memplan.errors import ProfileError
from memplan.model.spec import ModelSpec
from memplan.training.setup import Setup

__all__ = ["run_trainer"]

# memplan optimizer names -> TrainingArguments.optim
_OPTIM = {"adamw": "adamw_torch", "adamw_fused": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_32bit": "paged_adamw_32bit",
          "paged_adamw_8bit": "paged_adamw_8bit", "sgd": "sgd"}


def _tokenizer(vocab_size: int) -> Any:
    """A word-level fast tokenizer over `vocab_size` made-up tokens (pad 0, eos 2): TRL needs a
    processing class for its pad/eos ids; the dataset below is already tokenized."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2", unk_token="t1")


def _dataset(setup: Setup, spec: ModelSpec, steps: int) -> Any:
    import torch
    from datasets import Dataset

    rows = setup.batch_size * steps
    g = torch.Generator().manual_seed(0)
    # Token ids >= 3: never pad/unk/eos, so no row is shortened or masked.
    ids = torch.randint(3, spec.vocab_size, (rows, setup.seq_len), generator=g).tolist()
    data = {"input_ids": ids}
    if setup.recipe == "trainer":
        data["attention_mask"] = [[1] * setup.seq_len for _ in range(rows)]
        data["labels"] = ids
    return Dataset.from_dict(data)


def _lora_config(spec: ModelSpec, setup: Setup) -> Any:
    import peft

    from memplan.measure.profiler.build import _lora_targets

    kwargs: dict[str, Any] = {"r": setup.lora_rank, "lora_alpha": 2 * setup.lora_rank, "lora_dropout": setup.lora_dropout,
                              "target_modules": _lora_targets(spec, setup), "task_type": "CAUSAL_LM"}
    if setup.modules_to_save:
        kwargs["modules_to_save"] = list(setup.modules_to_save)
    return peft.LoraConfig(**kwargs)


def run_trainer(setup: Setup, spec: ModelSpec, steps: int, ckpt: Path, s: Any, measured: dict[str, Any]) -> None:
    """Like `run._run`, with the trainer's own loop doing the steps."""
    import torch
    import transformers

    from memplan.measure.profiler import build
    from memplan.measure.profiler.run import adopt_model, load_phase, optimizer_state_tensors, record_trainable

    if setup.optimizer not in _OPTIM:
        raise ProfileError(f"--recipe {setup.recipe} runs take TrainingArguments.optim names; {setup.optimizer} has none")
    if setup.device != "cpu":
        raise ProfileError(f"--recipe {setup.recipe} runs are CPU-ledger runs for now; use --device cpu")
    led = s.ledger
    state: dict[str, Any] = {"k": 0, "params": []}
    out_dir = tempfile.mkdtemp(prefix="memplan-trainer-")
    common = dict(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=setup.batch_size,
                  gradient_accumulation_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                  logging_strategy="no", optim=_OPTIM[setup.optimizer], learning_rate=1e-5,
                  gradient_checkpointing=bool(setup.grad_checkpointing),
                  # SFTConfig.bf16 defaults to True on a bf16 model (memplan.training.recipes.lora_under_autocast).
                  bf16=setup.autocast == "bf16" or (setup.recipe == "trl-sft" and setup.autocast == "none" and setup.param_dtype == "bf16"),
                  fp16=setup.autocast == "fp16", dataloader_num_workers=0, disable_tqdm=True, seed=0)

    def _mixin(base: type) -> type:
        class Measured(base):  # type: ignore[misc, valid-type]
            def compute_loss(self, model, inputs, *args, **kwargs):  # noqa: ANN001
                state["k"] += 1
                k = state["k"]
                prefix = "" if k == 1 else f"step{k}_"
                state["prefix"] = prefix
                if k == steps and steps >= 2:
                    led.open_window()
                s.begin(prefix + "forward")
                loss = super().compute_loss(model, inputs, *args, **kwargs)
                led.end_forward()
                state["fwd"] = s.end(prefix + "forward")
                s.begin(prefix + "backward")
                return loss

            def training_step(self, model, inputs, *args, **kwargs):  # noqa: ANN001
                out = super().training_step(model, inputs, *args, **kwargs)
                params = [p for p in model.parameters() if p.requires_grad]
                state["params"] = params
                led.adopt((p.grad for p in params), "gradients")
                s.end(state["prefix"] + "backward")
                state["grads"] = led.storage_bytes(p.grad for p in params)
                s.begin(state["prefix"] + "optimizer")
                return out

        return Measured

    class Phases(transformers.TrainerCallback):
        def on_optimizer_step(self, args, tstate, control, **kwargs):  # noqa: ANN001
            opt = kwargs.get("optimizer")
            if opt is not None:
                led.adopt(optimizer_state_tensors(opt), "optimizer_state")

        def on_step_end(self, args, tstate, control, **kwargs):  # noqa: ANN001
            prefix = state["prefix"]
            s.end(prefix + "optimizer")
            if state["k"] == steps:
                led.close_window()
                opt = kwargs.get("optimizer")
                tensors = optimizer_state_tensors(opt) if opt is not None else []
                paged = sum(t.untyped_storage().nbytes() for t in tensors if getattr(t, "is_paged", False))
                measured["gradients_bytes"] = state["grads"]
                measured["activations_bytes"] = state["fwd"]["ledger_by_category"]["activations"]
                measured["optimizer_state_bytes"] = led.storage_bytes(tensors) + paged
                measured["optimizer_paged_bytes"] = paged

    with led:
        model, _ = load_phase(s, spec, setup, ckpt, measured)

        s.begin("setup")
        dataset = _dataset(setup, spec, steps)
        if setup.recipe == "trl-sft":
            import peft
            from trl import SFTConfig, SFTTrainer

            if setup.prepare_kbit_training:  # the user's own script prepares the base before SFTTrainer
                model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup.grad_checkpointing,
                                                             gradient_checkpointing_kwargs={"use_reentrant": False})
            args = SFTConfig(**common, max_length=setup.seq_len, packing=False, dataset_num_proc=None)
            trainer = _mixin(SFTTrainer)(model=model, args=args, train_dataset=dataset, processing_class=_tokenizer(spec.vocab_size),
                                         peft_config=_lora_config(spec, setup) if setup.method == "lora" else None,
                                         callbacks=[Phases()])
        else:
            if setup.method == "lora":
                # Trainer takes a PEFT model; checkpointing is Trainer's (gradient_checkpointing=True).
                model = build.apply_training_setup(model, spec, _no_ckpt(setup))
            args = transformers.TrainingArguments(**common)
            trainer = _mixin(transformers.Trainer)(model=model, args=args, train_dataset=dataset,
                                                   data_collator=transformers.default_data_collator, callbacks=[Phases()])
        model = trainer.model
        adopt_model(led, model)
        params = [p for p in model.parameters() if p.requires_grad]
        s.end("setup")
        record_trainable(led, params, measured)
        measured["trainable_dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in params})
        torch.manual_seed(0)
        trainer.train()
        if state["k"] != steps:
            raise ProfileError(f"the trainer ran {state['k']} steps, expected {steps}")


def _no_ckpt(setup: Setup) -> Setup:
    import dataclasses

    # prepare_model_for_kbit_training stays (the user's script calls it); Trainer does the checkpointing.
    return dataclasses.replace(setup, grad_checkpointing=False, recipe="plain") if not setup.prepare_kbit_training else setup
