"""The demo's models: the policy (a hub name, a local folder, or the offline tiny model; with
LoRA adapters if asked), its tokenizer, and the frozen KL reference (used by train_gsm8k.py).

The policy's weights stay in fp32 (AdamW at lr 1e-6 needs them: bf16 would round most updates
away); the compute runs in bf16 under autocast where --dtype says so (demo/device.py).
"""

import dataclasses
from pathlib import Path

import torch


def load_model_and_tokenizer(cfg, checkpoint: Path | None = None):
    """The policy in fp32 (AdamW at lr 1e-6 needs fp32 weights: bf16 would round most updates
    away); compute runs in bf16 under autocast (--dtype). `checkpoint`: a saved run to load instead.
    With --lora-rank the model comes back wrapped in LoRA adapters, the only trainable weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from offline.tiny import byte_tokenizer, tiny_model  # offline stand-ins, for --model tiny
    tokenizer = byte_tokenizer() if cfg.model == "tiny" else hub_load(AutoTokenizer, cfg.model, "the tokenizer of")
    if checkpoint and not cfg.lora_rank:  # a LoRA checkpoint holds only the adapters
        model = hub_load(AutoModelForCausalLM, str(checkpoint), "the model", dtype=torch.float32)
    elif cfg.model == "tiny":
        model = tiny_model(len(tokenizer), init_std=0.02, seed=cfg.seed)
    else:
        model = hub_load(AutoModelForCausalLM, cfg.model, "the model", dtype=torch.float32)
    if cfg.gradient_checkpointing:  # renamed in transformers 5.x; the old name warns there
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if cfg.lora_rank:
        model = add_lora(model, cfg, checkpoint)
    return model, tokenizer


def add_lora(model, cfg, checkpoint: Path | None):
    """`model` wrapped in LoRA adapters of rank --lora-rank on every linear layer but the output
    head (new ones, or those saved in `checkpoint`); only the adapters train."""
    import peft
    if cfg.gradient_checkpointing:  # frozen embeddings: the checkpointed blocks need an input with grad
        model.enable_input_require_grads()
    if checkpoint:
        return peft.PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def hub_load(auto_class, name: str, what: str, **kwargs):
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:  # ValueError: a name that is neither a folder nor a hub id (4.57)
        hint = ("Is it a model folder, as save_pretrained writes one (config.json, the weights, the tokenizer's files)?"
                if Path(name).is_dir() else "Check the name and the network, or pass --model with a local folder.")
        raise SystemExit(f"could not load {what} {name!r}: {str(error).splitlines()[0]} {hint}")


def reference_model(cfg, model, device: str):
    """The frozen starting model for the KL term: none without KL (or without steps); with LoRA the
    policy itself with its adapters off (no second copy); else a second copy, from --model (the
    start, also after a resume)."""
    if not cfg.kl_coef or not cfg.steps:
        return None
    if cfg.lora_rank:
        return adapters_off(model)
    plain = dataclasses.replace(cfg, gradient_checkpointing=False)
    # fp32 weights, as the policy's: under autocast the embeddings, norms and residual stream run in
    # the weights' dtype, so a bf16 copy would compute another model (k3 KL 2e-3 a token before any
    # update, where an fp32 copy gives 0). The cost: 2 bytes a parameter more than bf16 (1.26 GB at 630M).
    return load_model_and_tokenizer(plain)[0].to(device, dtype=torch.float32).eval().requires_grad_(False)


def adapters_off(peft_model):
    """The KL reference of a LoRA run: the policy called with its adapters disabled, which is the
    starting model, without a second copy in memory. backward_loss calls it and reads its config."""
    def forward(*args, **kwargs):
        with peft_model.disable_adapter():
            return peft_model(*args, **kwargs)
    forward.config = peft_model.config
    return forward


def trainable(model) -> list:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]
