"""Every causal-LM family the installed transformers can build tiny, run through treerpo.py: what each one
does, measured, and what treerpo.py decides for it.

    python -m probes.families                    # the table (docs/families.md), a line a family
    python -m probes.families --only llama gpt2  # some families

For each class of transformers' causal-LM mapping: a tiny random config (hidden 64, 2 layers, a 259-token
byte vocabulary; the family's defaults elsewhere), built in code, offline, and three checks, as the
method's own tests make them on Qwen2 and Llama:
    greedy     greedy tree leaves equal plain `generate` (some rows stop at EOS mid-tree)
    logprobs   the log-probs recorded while sampling equal teacher forcing
    loss       the default loss's gradient equals the leaf paths' (packed where packing measured right)
The outcome: right (packed rows, or leaf paths), or refused in one line (the reason), or not built
tiny (the family's own code failed first: no tiny config, or its own `generate` failed).
"""

import argparse
import copy
import sys

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from offline.tiny import byte_tokenizer
from treerpo import assign_advantages, backward_loss, leaves, nodes, response_tokens, sample_trees, token_logprobs

PROMPTS = ["hello there", "a much longer prompt, with more words in it", "x"]  # three lengths: left padding
TOKENS = dict(pad_token_id=257, eos_token_id=256, bos_token_id=258, decoder_start_token_id=258)
SHAPE = dict(vocab_size=259, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, initializer_range=0.2,
             is_decoder=True, use_cache=True, num_experts=4, num_local_experts=4, n_routed_experts=4,
             num_experts_per_tok=2, moe_intermediate_size=32, **TOKENS)
MOST_PARAMETERS = 20_000_000  # past this a config did not shrink: not tiny


# Families built with more than SHAPE: the failure modes a stock config hides at this size.
VARIANTS = {"gpt_neo, local window 8": ("gpt_neo", dict(attention_types=[[["global", "local"], 1]], window_size=8)),
            "falcon, ALiBi": ("falcon", dict(alibi=True)),
            "mistral, window 8": ("mistral", dict(sliding_window=8)),
            "gemma3_text, window 8": ("gemma3_text", dict(sliding_window=8))}
# Names a family reads its shape from, beside SHAPE's: layers, rotary and latent-attention sizes, decoder layers.
MORE = dict(num_layers=2, rotary_dim=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, kv_lora_rank=16,
            q_lora_rank=16, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4,
            d_model=64, decoder_ffn_dim=64, encoder_ffn_dim=64, attention_types=[[["global"], 2]],
            forced_eos_token_id=None, tie_word_embeddings=False)


def families() -> dict[str, tuple[str, str, dict]]:
    """{name: (model_type, class name, config settings)}: a model_type for each class of the causal-LM
    mapping (the one whose config the class declares), then the VARIANTS."""
    chosen = {}
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        model_class = getattr(transformers, class_name, None)
        if model_type not in CONFIG_MAPPING:
            continue
        own = model_class is not None and CONFIG_MAPPING[model_type] is getattr(model_class, "config_class", None)
        if own or class_name not in {c for _, c, _ in chosen.values()}:
            chosen = {name: entry for name, entry in chosen.items() if not (own and entry[1] == class_name)}
            chosen[model_type] = (model_type, class_name, {})
    for name, (model_type, settings) in VARIANTS.items():
        chosen[name] = (model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], settings)
    return chosen


def build(model_type: str, class_name: str, settings: dict | None = None, seed: int = 0):
    """A tiny random model of the family in eval mode, its EOS logit raised so that some rows stop early;
    a ValueError with the reason where the family cannot be built tiny."""
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise ValueError(f"transformers has no {class_name}")
    error = None
    for shape in (SHAPE | MORE, SHAPE, {key: value for key, value in SHAPE.items() if key != "head_dim"}):
        try:
            config = CONFIG_MAPPING[model_type](**(shape | (settings or {})))
            break
        except Exception as failure:  # another family's names: try fewer
            error = failure
    else:
        raise ValueError(f"{type(error).__name__}: {first_line(error)}")
    try:
        if hasattr(config, "get_text_config") and config.get_text_config() is not config:
            raise ValueError("a multimodal config: its text model is its own family")
        config._attn_implementation = "sdpa" if model_class._supports_sdpa else "eager"
        with torch.device("meta"):
            size = sum(parameter.numel() for parameter in model_class(config).parameters())
        if size > MOST_PARAMETERS:
            raise ValueError(f"{size / 1e6:.0f}M parameters with a tiny shape")
        torch.manual_seed(seed)
        model = model_class(config).eval()
    except Exception as error:
        raise ValueError(f"{type(error).__name__}: {first_line(error)}") from None
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and head.out_features == SHAPE["vocab_size"]:
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
        with torch.no_grad():
            head.bias[TOKENS["eos_token_id"]] = 2.0
    return model


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:150]


def greedy_reference(model, tokenizer, prompt, max_new_tokens):
    """Plain HF greedy decoding of one unpadded prompt, cut after the first EOS."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    tokens = out[0, ids.shape[1]:].tolist()
    return tokens[:tokens.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in tokens else tokens


def check(model, tokenizer) -> dict:
    """The three checks on one tiny model: {"outcome": ..., "reason": ...}; raises AssertionError where
    treerpo.py gives a wrong number without a word (what must never happen)."""
    try:
        references = [greedy_reference(model, tokenizer, prompt, 8) for prompt in PROMPTS]
    except Exception as error:
        return {"outcome": "not built tiny", "reason": f"its own generate raised {type(error).__name__}: "
                f"{first_line(error)}"}
    try:
        roots = sample_trees(model, tokenizer, PROMPTS, branch=2, depth=2, segment_tokens=4, do_sample=False)
    except ValueError as error:
        assert "\n" not in str(error), str(error)
        return {"outcome": "refused", "reason": str(error)}
    for root, expected in zip(roots, references):
        assert [response_tokens(leaf) for leaf in leaves(root)] == [expected] * len(leaves(root)), "greedy leaves"
    torch.manual_seed(0)
    roots = sample_trees(model, tokenizer, PROMPTS, branch=2, depth=3, segment_tokens=4, temperature=0.7,
                         return_logprobs=True)
    for root in roots:
        for node in nodes(root)[1:]:
            ids = torch.tensor([root.tokens + response_tokens(node)])
            with torch.no_grad():
                forced = token_logprobs(model, ids, torch.ones_like(ids), 0.7)[0, -len(node.tokens):]
            assert torch.allclose(torch.tensor(node.logprobs), forced, atol=1e-4), "recorded log-probs"
        for number, leaf in enumerate(leaves(root)):
            leaf.reward = float(number % 2)  # siblings differ: every node trains
        assign_advantages(root, tau=0.0)
    results = []
    for packed in (False, None):
        model.zero_grad()
        _, stats = backward_loss(model, roots, packed=packed, temperature=0.7)
        results.append((stats, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    model.zero_grad()
    (_, paths), (stats, default) = results
    scale = paths.abs().max()
    assert scale > 0 and (default - paths).abs().max() <= 1e-4 * scale + 1e-8, "the loss's gradient"
    return {"outcome": "right", "reason": "packed rows" if stats["packed"] else "leaf paths: a packed row measured "
            "other log-probs"}


def walk(only=None):
    """(name, class name, result) for every family (or those whose name or model type is in `only`)."""
    tokenizer = byte_tokenizer()
    for name, (model_type, class_name, settings) in families().items():
        if only and name not in only and model_type not in only:
            continue
        try:
            model = build(model_type, class_name, settings)
        except ValueError as error:
            yield name, class_name, {"outcome": "not built tiny", "reason": str(error)}
            continue
        try:
            yield name, class_name, check(copy.deepcopy(model), tokenizer)
        except AssertionError as error:
            yield name, class_name, {"outcome": "WRONG", "reason": f"{error} differ"}
        except Exception as error:  # a traceback from inside transformers: what must never reach a user
            yield name, class_name, {"outcome": "WRONG", "reason": f"{type(error).__name__}: {first_line(error)}"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help="model types (llama gpt2 ...)")
    args = parser.parse_args(argv)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print("| family | class | outcome | reason |\n| --- | --- | --- | --- |")
    for model_type, class_name, result in walk(args.only):
        print(f"| {model_type} | {class_name} | {result['outcome']} | {result['reason'].replace('|', '/')} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
