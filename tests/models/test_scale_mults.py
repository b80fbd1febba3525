"""µP-style scale knobs of LMConfig: init std multipliers per module group and the feed-forward output multiplier."""

from __future__ import annotations

import pytest
import torch

from moekit.models import LMConfig, MoELM
from moekit.models.lm import init_multiplier
from tests.helpers import TINY_LM

# a dense first block, then MoE blocks with a shared expert and an untied head: every parameter group occurs
TINY = dict(TINY_LM, n_layers=2, max_seq_len=16, num_experts=4, expert_hidden=16, first_k_dense=1,
            num_shared_experts=1, tie_embeddings=False)
MULTS = ("embed_init_mult", "attn_init_mult", "ffn_init_mult", "ffn_out_mult")


def build(**changes) -> MoELM:
    torch.manual_seed(0)
    return MoELM(LMConfig(**TINY, **changes))


def test_defaults_are_bit_identical_to_no_multiplier():
    base, ones = build(), build(**dict.fromkeys(MULTS, 1.0))
    ids = torch.randint(0, 64, (2, 8))
    for (n, a), b in zip(base.state_dict().items(), ones.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert torch.equal(base(ids).logits, ones(ids).logits)


@pytest.mark.parametrize("field,group", [
    ("embed_init_mult", ("embed_tokens.weight", "lm_head.weight")),
    ("attn_init_mult", ("self_attn.",)),
    ("ffn_init_mult", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.experts.", "mlp.shared_experts.")),
])
@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_init_mult_scales_its_group_exactly(field, group, factor):
    base, scaled = build(), build(**{field: factor})
    hit = 0
    for (n, a), b in zip(base.named_parameters(), scaled.parameters(), strict=True):
        if a.dim() >= 2 and any(g in n for g in group):
            assert torch.equal(b, a * factor), n  # same draws, std exactly `factor` apart
            hit += 1
        else:
            assert torch.equal(a, b), n  # other groups (norms, routers) untouched
    assert hit >= len(group)
    assert init_multiplier(scaled.config, "layers.1.mlp.router.weight") == 1.0


@pytest.mark.parametrize("factor", [2.0, 0.25, 3.0])
def test_ffn_out_mult_scales_every_ffn_output_exactly(factor):
    base, scaled = build(), build(ffn_out_mult=factor)
    h = torch.randn(2, 8, TINY["dim"])
    for b0, b1 in zip(base.layers, scaled.layers, strict=True):  # block 0 dense, block 1 MoE (+ shared)
        y0, r0 = b0._ffn(h, _context(h), None)
        y1, r1 = b1._ffn(h, _context(h), None)
        assert torch.equal(y1, y0 * factor)
        assert (r0 is None) == (r1 is None) == (b0.layer == 0)
    # the weights are the same, so the model output differs only through the block outputs
    ids = torch.randint(0, 64, (2, 8))
    assert not torch.equal(base(ids).logits, scaled(ids).logits)


def _context(h):
    from moekit.routing import RoutingContext

    return RoutingContext(seq_len=h.shape[1])


def test_config_round_trip_and_bad_values(tmp_path):
    cfg = LMConfig(**TINY, embed_init_mult=0.5, attn_init_mult=2.0, ffn_init_mult=1.5, ffn_out_mult=4.0)
    cfg.save(tmp_path / "config.json")
    assert LMConfig.load(tmp_path / "config.json") == cfg
    assert LMConfig.from_dict(cfg.to_dict()).ffn_out_mult == 4.0
    for field in MULTS:
        for bad in (0, -1.0, float("inf"), float("nan"), True, "2"):
            with pytest.raises(ValueError, match=f"LMConfig.{field} must be a finite number > 0"):
                LMConfig(**TINY, **{field: bad})


def test_hf_export_folds_ffn_out_mult():
    from moekit.hf.export import folded_scales, hf_config_for

    cfg = LMConfig(**dict(TINY, first_k_dense=0, num_shared_experts=0), ffn_out_mult=2.0)
    hf_config_for(cfg, "mixtral")  # expressible: the export multiplies it into the down projections
    assert folded_scales(cfg) == (2.0, 2.0)
