"""Which Hugging Face model families `treerpo.py` runs, decided by what each model does: every causal-LM
family the installed transformers can build tiny (probes/families.py builds and checks them) is right
(greedy leaves equal plain `generate`, recorded log-probs equal teacher forcing, the default loss's
gradient equals the leaf paths'), or refused in one line; never a wrong number, never a traceback from
inside transformers. Marked: `python -m pytest -m families` (CI runs it on the oldest and the newest
supported transformers). The unmarked tests below are the cases a name list once decided."""

import copy

import pytest
import torch
import transformers

from offline.tiny import byte_tokenizer
from probes import families
from treerpo import assign_advantages, backward_loss, leaves, response_tokens, sample_trees

FAMILIES = families.families()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.mark.families
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_is_right_or_refused_in_one_line(tokenizer, name):
    model_type, class_name, settings = FAMILIES[name]
    try:
        model = families.build(model_type, class_name, settings)
    except ValueError as error:
        pytest.skip(f"not built tiny: {error}")
    result = families.check(model, tokenizer)  # raises AssertionError where a number is wrong
    if result["outcome"] == "not built tiny":
        pytest.skip(result["reason"])
    assert result["outcome"] in ("right", "refused") and "\n" not in result["reason"]


@pytest.mark.parametrize("name, packs", [("llama", True), ("gpt_neo, local window 8", False),
                                         ("falcon, ALiBi", False), ("mistral, window 8", False)])
def test_a_window_or_a_position_bias_the_tree_mask_would_lose_trains_leaf_paths(tokenizer, name, packs):
    """GPT-Neo's local window (stored as window_size), Falcon's ALiBi from a 2D mask, Mistral's sliding
    window: a packed row measures other log-probs (or raises), so the default trains leaf paths, right."""
    model = families.build(*FAMILIES[name])
    assert families.check(model, tokenizer) == {"outcome": "right", "reason": "packed rows" if packs else
                                                 "leaf paths: a packed row measured other log-probs"}


@pytest.mark.parametrize("name", ["mamba", "rwkv", "trocr"])
def test_a_model_a_copied_cache_does_not_branch_is_refused_in_one_line(tokenizer, name):
    """A recurrent state (Mamba, RWKV), positions counted past the padding (TrOCR): refused by measurement."""
    model = families.build(*FAMILIES[name])
    with pytest.raises(ValueError, match=f"^{FAMILIES[name][1]} cannot be sampled as a tree: (continuing a copied "
                                         "KV cache raised|the log-probs of tokens drawn on a copied KV cache are off)"
                       ) as refusal:
        sample_trees(model, tokenizer, families.PROMPTS, branch=2, depth=2, segment_tokens=4)
    assert "\n" not in str(refusal.value)


def test_an_encoder_decoder_is_refused_in_one_line(tokenizer):
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=259, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4, pad_token_id=257, eos_token_id=256,
        decoder_start_token_id=257))
    with pytest.raises(ValueError, match="^T5ForConditionalGeneration cannot be sampled as a tree: continuing a "
                                         "copied KV cache raised (ValueError|TypeError): "):
        sample_trees(model, tokenizer, families.PROMPTS, branch=2, depth=2, segment_tokens=4)


def test_a_bare_assert_inside_a_model_is_still_one_line(tokenizer):
    """Model code often asserts without a message: the refusal names the error even when it says nothing."""
    model = families.build(*FAMILIES["llama"])

    def forward(*args, **kwargs):
        raise AssertionError
    model.forward = forward
    with pytest.raises(ValueError, match="^LlamaForCausalLM cannot be sampled as a tree: continuing a copied KV "
                                         "cache raised AssertionError: $"):
        sample_trees(model, tokenizer, families.PROMPTS, branch=2, depth=2, segment_tokens=4)


def test_a_mixture_of_experts_that_returns_router_logits_still_packs(tokenizer):
    """config.output_router_logits=True makes the router's balancing loss read the attention mask as
    2D, which a packed row's tree mask is not: the forwards ask for no router logits."""
    model = families.build(*FAMILIES["mixtral"])
    model.config.output_router_logits = True
    roots = sample_trees(model, tokenizer, families.PROMPTS, branch=2, depth=2, segment_tokens=4, temperature=0.7)
    for root in roots:
        for number, leaf in enumerate(leaves(root)):
            leaf.reward = float(number % 2)
        assign_advantages(root, tau=0.0)
    _, stats = backward_loss(model, roots, packed=True, temperature=0.7)
    assert stats["packed"] and stats["tokens"] > 0


def test_a_generation_config_that_names_its_own_cache_still_samples(tokenizer):
    """Gemma's published generation configs name cache_implementation "hybrid"; the tree brings its own
    DynamicCache, so the setting is overridden, not refused."""
    model = families.build(*FAMILIES["gemma3_text"])
    expected = [families.greedy_reference(model, tokenizer, prompt, 8) for prompt in families.PROMPTS]
    hybrid = copy.deepcopy(model)
    hybrid.generation_config.cache_implementation = "hybrid"
    roots = sample_trees(hybrid, tokenizer, families.PROMPTS, branch=2, depth=2, segment_tokens=4, do_sample=False)
    assert [response_tokens(leaves(root)[0]) for root in roots] == expected


def test_the_branch_check_costs_a_few_forwards_of_at_most_8_tokens():
    tokenizer = byte_tokenizer()
    model = families.build(*FAMILIES["llama"])
    lengths = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(
        (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape), with_kwargs=True)
    torch.manual_seed(0)
    sample_trees(model, tokenizer, families.PROMPTS[:1], branch=1, depth=1, segment_tokens=1, do_sample=False)
    hook.remove()
    probe = lengths[:-2]  # the sampling itself: the prompt's prefill and one generate step
    assert len(probe) <= 16 and all(shape[-1] <= 8 for shape in probe)
