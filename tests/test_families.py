"""Which Hugging Face model families `treerpo.py` runs: a tiny random config of each, built in code,
offline, checked the way the method's own tests check Qwen2 and Llama. CI runs this file on
transformers 4.57.6 (the oldest supported) and on the newest.

For every family:
    greedy      greedy tree leaves equal plain `generate` (rows that stop at EOS mid-tree included)
    logprobs    the log-probs recorded while sampling equal teacher forcing
    packed      the packed loss and gradient equal the leaf paths' where the model can pack; where it
                cannot (a sliding window shorter than a path), backward_loss chooses leaf paths itself
    updates     a few AdamW steps on a toy reward keep the loss, the gradient and the weights finite
And the families whose generation state a KV-cache copy cannot branch are refused in one line.
"""

import copy
import functools
import math

import pytest
import torch
import transformers

from offline.tiny import byte_tokenizer
from test_treerpo import PROMPTS, greedy_reference, teacher_forced
from treerpo import assign_advantages, backward_loss, can_pack, leaves, nodes, response_tokens, sample_trees
from treepo import sample_budgeted_trees

TOKENS = dict(pad_token_id=257, eos_token_id=256, bos_token_id=None)  # the byte tokenizer's; defaults differ per family
SHAPE = dict(vocab_size=259, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.2,
             **TOKENS)
GEMMA = dict(SHAPE, head_dim=16, query_pre_attn_scalar=16, sliding_window=4096, tie_word_embeddings=False,
             layer_types=["sliding_attention", "full_attention"])  # tied, Gemma's scaled embeddings repeat one token
WINDOW = 8  # shorter than every path here: packing is refused, leaf paths train

# name: (config class, model class, config, attention implementation, what the README's table says runs)
FAMILIES = {
    "Llama": ("LlamaConfig", "LlamaForCausalLM", SHAPE, "sdpa"),
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM", SHAPE, "sdpa"),
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(SHAPE, head_dim=16), "sdpa"),
    "Qwen3-MoE": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(SHAPE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                       mlp_only_layers=[], norm_topk_prob=True), "sdpa"),
    "Mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(SHAPE, num_local_experts=4, num_experts_per_tok=2), "sdpa"),
    "Mistral": ("MistralConfig", "MistralForCausalLM", dict(SHAPE, sliding_window=None), "sdpa"),
    "Mistral, window 8": ("MistralConfig", "MistralForCausalLM", dict(SHAPE, sliding_window=WINDOW), "sdpa"),
    "Gemma 2": ("Gemma2Config", "Gemma2ForCausalLM", GEMMA, "eager"),  # sdpa cannot soft-cap its attention
    "Gemma 3 (text)": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA, "sdpa"),
    "Gemma 3 (text), window 8": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(GEMMA, sliding_window=WINDOW), "sdpa"),
    "Phi-3": ("Phi3Config", "Phi3ForCausalLM", SHAPE, "sdpa"),
    "GPT-2": ("GPT2Config", "GPT2LMHeadModel",
              dict(vocab_size=259, n_embd=64, n_inner=64, n_layer=2, n_head=4, n_positions=1024, resid_pdrop=0.0,
                   embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, initializer_range=0.2, **TOKENS), "sdpa"),
    "GPT-NeoX": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=259, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.2, **TOKENS), "sdpa"),
    "OLMo 2": ("Olmo2Config", "Olmo2ForCausalLM", SHAPE, "sdpa"),
    "Granite": ("GraniteConfig", "GraniteForCausalLM", dict(SHAPE, logits_scaling=0.5), "sdpa"),
    "Cohere": ("CohereConfig", "CohereForCausalLM", dict(SHAPE, logit_scale=0.5), "sdpa"),
    "SmolLM3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(SHAPE, no_rope_layers=[1, 0]), "sdpa"),
}
REFUSED = {  # name: (config class, model class, config, the reason's words)
    "Mamba (state space)": ("MambaConfig", "MambaForCausalLM",
                            dict(vocab_size=259, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2,
                                 conv_kernel=4, tie_word_embeddings=True, **TOKENS), "cannot branch"),
    "Jamba (hybrid)": ("JambaConfig", "JambaForCausalLM",
                       dict(SHAPE, num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1,
                            attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                            mamba_dt_rank=8, use_mamba_kernels=False), "cannot branch"),
    "T5 (encoder-decoder)": ("T5Config", "T5ForConditionalGeneration",
                             dict(vocab_size=259, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
                                  dropout_rate=0.0, pad_token_id=257, eos_token_id=256, decoder_start_token_id=257),
                             "encoder-decoder"),
    "BART (encoder-decoder)": ("BartConfig", "BartForConditionalGeneration",
                               dict(vocab_size=259, d_model=64, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                    decoder_ffn_dim=64, dropout=0.0, **TOKENS), "encoder-decoder"),
}


def build(config_class, model_class, config, attention=None, seed=0, eos_bias=3.0):
    """A tiny random model of the family, in eval mode; its EOS raised so some rows stop mid-tree."""
    torch.manual_seed(seed)
    settings = dict(config, **({"attn_implementation": attention} if attention else {}))
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**settings)).eval()
    head = model.get_output_embeddings()
    if eos_bias and head is not None:
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
        with torch.no_grad():
            head.bias[TOKENS["eos_token_id"]] = eos_bias
    return model


EOS_BIAS = {"Qwen3-MoE": 1.0, "Mixtral": 2.0}  # their logits are flatter: 3.0 stops nearly every row at once


@functools.cache
def family_model(name):
    return build(*FAMILIES[name], eos_bias=EOS_BIAS.get(name, 3.0))


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def scored(roots):
    """A stand-in reward (the last token's parity), so that groups differ; tau 0 keeps every group."""
    for root in roots:
        for leaf in leaves(root):
            leaf.reward = float(response_tokens(leaf)[-1] % 2 == 0)
        assign_advantages(root, tau=0.0)
    return roots


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_leaves_equal_plain_generate(tokenizer, name):
    model = family_model(name)
    roots = sample_trees(model, tokenizer, PROMPTS, branch=2, depth=2, segment_tokens=4, do_sample=False)
    for root, prompt in zip(roots, PROMPTS):
        expected = greedy_reference(model, tokenizer, prompt, max_new_tokens=2 * 4)
        assert [response_tokens(leaf) for leaf in leaves(root)] == [expected] * len(leaves(root))


@pytest.mark.parametrize("name", FAMILIES)
def test_recorded_logprobs_equal_teacher_forcing(tokenizer, name):
    model = family_model(name)
    torch.manual_seed(0)
    roots = sample_trees(model, tokenizer, PROMPTS, branch=2, depth=3, segment_tokens=4, temperature=0.7,
                         return_logprobs=True)
    for root in roots:
        for node in nodes(root)[1:]:
            expected = teacher_forced(model, root, node, temperature=0.7)
            torch.testing.assert_close(torch.tensor(node.logprobs), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_loss_equals_leaf_paths_or_leaf_paths_are_chosen(tokenizer, name):
    """Where packing is allowed its loss and gradient are the leaf paths'; where a sliding window is
    shorter than a path, the default (packed=None) trains leaf paths by itself."""
    model = family_model(name)
    torch.manual_seed(1)
    roots = scored(sample_trees(model, tokenizer, PROMPTS, branch=2, depth=3, segment_tokens=4, temperature=0.7))
    results = []
    for packed in (False, None):
        model.zero_grad()
        loss, stats = backward_loss(model, roots, packed=packed, temperature=0.7)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss, stats, grads))
    model.zero_grad()
    (loss, _, grads), (default_loss, default_stats, default_grads) = results
    assert default_stats["packed"] is can_pack([model], roots, None) and grads.abs().sum() > 0
    assert default_stats["packed"] is ("window" not in name)
    assert default_loss == pytest.approx(loss, abs=1e-5)
    torch.testing.assert_close(default_grads, grads, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_few_updates_stay_finite(tokenizer, name):
    model = copy.deepcopy(family_model(name)).train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(2)
    for _ in range(3):
        roots = scored(sample_trees(model, tokenizer, PROMPTS[:2], branch=2, depth=2, segment_tokens=4))
        loss, stats = backward_loss(model, roots, ref_model=reference, kl_coef=0.01)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        optimizer.step()
        optimizer.zero_grad()
        assert math.isfinite(loss) and math.isfinite(grad_norm) and math.isfinite(stats["kl"])
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


@pytest.mark.parametrize("name", REFUSED)
def test_a_cache_that_copying_cannot_branch_is_refused_in_one_line(tokenizer, name):
    config_class, model_class, config, reason = REFUSED[name]
    model = build(config_class, model_class, config, eos_bias=0)
    for sampler in (lambda: sample_trees(model, tokenizer, PROMPTS, branch=2, depth=2, segment_tokens=4),
                    lambda: sample_budgeted_trees(model, tokenizer, PROMPTS, width=4, segment_tokens=4, max_depth=2)):
        with pytest.raises(ValueError, match=reason) as refusal:
            sampler()
        assert "\n" not in str(refusal.value) and model_class in str(refusal.value)


def test_a_mixture_of_experts_that_returns_router_logits_still_packs(tokenizer):
    """config.output_router_logits=True makes the router's balancing loss read the attention mask as
    2D, which a packed row's tree mask is not: the forwards ask for no router logits."""
    model = copy.deepcopy(family_model("Mixtral"))
    model.config.output_router_logits = True
    roots = scored(sample_trees(model, tokenizer, PROMPTS, branch=2, depth=2, segment_tokens=4, temperature=0.7))
    _, stats = backward_loss(model, roots, packed=True, temperature=0.7)
    assert stats["packed"] and stats["tokens"] > 0


def test_a_generation_config_that_names_its_own_cache_still_samples(tokenizer):
    """Gemma's published generation configs name cache_implementation "hybrid"; the tree brings its own
    DynamicCache, so the setting is overridden, not refused."""
    model = copy.deepcopy(family_model("Gemma 3 (text)"))
    model.generation_config.cache_implementation = "hybrid"
    roots = sample_trees(model, tokenizer, PROMPTS, branch=2, depth=2, segment_tokens=4, do_sample=False)
    expected = [greedy_reference(family_model("Gemma 3 (text)"), tokenizer, prompt, 8) for prompt in PROMPTS]
    assert [response_tokens(leaves(root)[0]) for root in roots] == expected
