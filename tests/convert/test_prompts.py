"""Router from prompts (mergekit-moe): rows are the normalised mean FFN inputs, a prompt routes to its expert."""

from __future__ import annotations

import pytest
import torch

from moekit.convert.prompts import PromptsConfig, ffn_inputs, prompt_rows, prompts_moe
from tests.convert.conftest import dense_lm

PROMPTS = [[[3, 9, 27, 17], [5, 6]], [[40, 41, 42]], [[60, 2, 2, 61, 33]]]


def test_hidden_rows_equal_the_hand_computed_mean():
    base = dense_lm(seed=4)
    rows = prompt_rows(base, PROMPTS, "hidden")
    assert rows.shape == (2, 3, 32)
    # by hand: run the whole base model, read each block's FFN input by recomputing the block step by step
    for e, ps in enumerate(PROMPTS):
        for layer in range(2):
            acc = torch.zeros(32)
            for p in ps:
                ids = torch.tensor([p])
                x = base.embed_tokens(ids)
                cos, sin = base.rope_cos[: len(p)], base.rope_sin[: len(p)]
                for i, block in enumerate(base.layers):
                    x = x + block.self_attn(block.input_layernorm(x), cos, sin, None, i)
                    h = block.post_attention_layernorm(x)
                    if i == layer:
                        acc += h[0].sum(0)
                    x = x + block.mlp(h)
            mean = acc / sum(len(p) for p in ps)
            torch.testing.assert_close(rows[layer, e], mean / mean.norm(), atol=1e-5, rtol=1e-4)
    emb = prompt_rows(base, PROMPTS, "embed")
    want = base.embed_tokens.weight[[40, 41, 42]].mean(0)
    torch.testing.assert_close(emb[1, 1], want / want.norm())
    rnd = prompt_rows(base, PROMPTS, "random", seed=3)
    torch.testing.assert_close(rnd.norm(dim=-1), torch.ones(2, 3))
    assert torch.equal(rnd, prompt_rows(base, PROMPTS, "random", seed=3))


def test_a_prompt_routes_to_its_own_expert_first():
    base = dense_lm(seed=4)
    experts = [dense_lm(seed=s) for s in (5, 6, 7)]
    moe = prompts_moe(base, experts, [[p[0]] for p in PROMPTS], PromptsConfig(k=1)).eval()
    for e, ps in enumerate(PROMPTS):
        ids = torch.tensor([ps[0]])
        out = moe(ids)
        # block 0's FFN input is the base model's (same embeddings and attention), so the mean router logit over the
        # prompt's tokens is |mean state| for its own expert and smaller for any other unit row (Cauchy-Schwarz)
        logits = out.routings[0].logits.mean(0)
        assert int(logits.argmax()) == e
        h = ffn_inputs(base, ids[0])[0].mean(0)
        torch.testing.assert_close(logits[e], h.norm(), atol=1e-5, rtol=1e-4)
    # the experts are the sources' FFNs, attention the base's
    assert torch.equal(moe.layers[1].mlp.experts.down_proj[2], experts[2].layers[1].mlp.down_proj.weight)
    assert torch.equal(moe.layers[0].self_attn.o_proj.weight, base.layers[0].self_attn.o_proj.weight)


def test_identical_sources_equal_the_base():
    base = dense_lm(seed=4)
    moe = prompts_moe(base, [base, base, base], PROMPTS, PromptsConfig(k=2)).eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(moe(ids).logits, base(ids).logits, atol=1e-5, rtol=0)


def test_bad_input_is_a_clear_error():
    base = dense_lm()
    with pytest.raises(ValueError, match="one list of prompts per expert \\(2\\), got 3"):
        prompts_moe(base, [base, base], PROMPTS)
    with pytest.raises(ValueError, match="expert 1 needs at least one non-empty prompt"):
        prompts_moe(base, [base, base], [[[1]], []])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\), got 99"):
        prompts_moe(base, [base], [[[1, 99]]], PromptsConfig(k=1))
    with pytest.raises(ValueError, match="PromptsConfig.mode must be one of"):
        PromptsConfig(mode="cheap")
    with pytest.raises(ValueError, match="another architecture"):
        prompts_moe(base, [dense_lm(dim=16, n_heads=2, n_kv_heads=1)], [[[1]]], PromptsConfig(k=1))
