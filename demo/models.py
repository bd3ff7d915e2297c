"""The models and their precision: the policy (LoRA adapters if asked), its tokenizer, the frozen KL
reference. Weights and AdamW stay fp32 (at lr 1e-6 bf16 weights would round most updates away); the
compute runs in bf16 under autocast where --dtype says so (auto: a GPU, or a CPU with bf16 instructions)."""

import dataclasses
from pathlib import Path

import torch


def load(cfg, checkpoint: Path | None = None):
    """(model, tokenizer): the policy in fp32 with its dropout off, from `checkpoint` if given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from offline.tiny import byte_tokenizer, tiny_model  # offline stand-ins, for --model tiny
    tokenizer = byte_tokenizer() if cfg.model == "tiny" else hub_load(AutoTokenizer, cfg.model)
    if checkpoint and not cfg.lora_rank:  # a LoRA checkpoint holds only the adapters
        model = hub_load(AutoModelForCausalLM, str(checkpoint), dtype=torch.float32)
    elif cfg.model == "tiny":
        model = tiny_model(len(tokenizer), init_std=0.02, seed=cfg.seed)
    else:
        model = hub_load(AutoModelForCausalLM, cfg.model, dtype=torch.float32)
    dropout_off(model)
    if cfg.gradient_checkpointing:  # renamed in transformers 5.x; the old name warns there
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if cfg.lora_rank:
        import peft
        if cfg.gradient_checkpointing:  # frozen embeddings: the checkpointed blocks need an input with grad
            model.enable_input_require_grads()
        if checkpoint:
            return peft.PeftModel.from_pretrained(model, checkpoint, is_trainable=True), tokenizer
        config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config)
    return model, tokenizer


def dropout_off(model):
    """Every dropout to 0, as TRL does: the loss, in train mode, then computes the model that sampled
    (in eval mode). Modules (nn.Dropout) and the attention's own rate (attention_dropout) alike."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def hub_load(auto_class, name: str, **kwargs):
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except Exception as error:  # a missing or damaged folder, a wrong hub name, no network: one line
        raise SystemExit(f"could not load {name!r}: {str(error).splitlines()[0]} (a model folder, as "
                         "save_pretrained writes one, or a hub name with the network on)")


def reference_model(cfg, model, device: str):
    """The frozen start for the KL term: none without KL; with LoRA the policy with its adapters off;
    else a second copy, in fp32 as the policy (a bf16 copy under autocast computes another model)."""
    if not cfg.kl_coef or not cfg.steps:
        return None
    if cfg.lora_rank:
        return adapters_off(model)
    plain = dataclasses.replace(cfg, gradient_checkpointing=False, lora_rank=0)
    return load(plain)[0].to(device, dtype=torch.float32).eval().requires_grad_(False)


def adapters_off(peft_model):
    """The KL reference of a LoRA run: the policy called with its adapters off, the start, without a copy."""
    def forward(*args, **kwargs):
        with peft_model.disable_adapter():
            return peft_model(*args, **kwargs)
    forward.config = peft_model.config
    return forward


def bf16(device, dtype: str) -> bool:
    """--dtype: bf16 compute? auto: on a GPU, and on a CPU with bf16 instructions (elsewhere emulated, slow)."""
    cpu_has_bf16 = any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                               "_is_amx_tile_supported"))
    return dtype == "bf16" or (dtype == "auto" and (torch.device(device).type == "cuda" or cpu_has_bf16))


def autocast(device, dtype: str):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16(device, dtype))


def peak_memory(device) -> dict:
    """The step's peak GPU memory in GB, then reset; nothing on a CPU."""
    if torch.device(device).type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {"gpu_max_allocated_gb": peak}
