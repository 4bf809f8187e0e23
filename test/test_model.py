"""Model construction in-process: registry, stage slicing, partitions, TP checks, RoPE scaling."""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_checkpoint
from pipeserve.model.config import ModelConfig, head_cost_in_layers, partition_layers, stage_layers
from pipeserve.model.loader import load_weights
from pipeserve.model.parallel import ParallelContext
from pipeserve.model.registry import build_stage_model
from pipeserve.model.rotary import inverse_frequencies


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("tied")), "llama", layers=5, tied=True)


def _stage(path: str, pp_rank: int, pp_size: int, partition: str | None = None):
    cfg = ModelConfig.from_dir(path)
    model = build_stage_model(
        cfg,
        ParallelContext(pp_rank=pp_rank, pp_size=pp_size),
        torch.float32,
        torch.device("cpu"),
        partition,
    )
    load_weights(model, path)
    return model


def test_unknown_architecture_is_named_with_the_supported_ones(tmp_path):
    cfg = ModelConfig.from_dir(make_checkpoint(str(tmp_path), "llama", layers=1))
    cfg = ModelConfig.from_dict({**cfg.raw, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        build_stage_model(cfg, ParallelContext(), torch.float32, torch.device("cpu"))


def test_default_partition_puts_remainder_on_last_stages():
    assert partition_layers(7, 3, "") == [(0, 2), (2, 4), (4, 7)]
    assert partition_layers(8, 3, "") == [(0, 2), (2, 5), (5, 8)]
    assert partition_layers(4, 4, "") == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1,2", "has 2 entries"),
        ("2,2,2", "sums to 6"),
        ("0,3,4", "at least one layer"),
        ("a,b,c", "integers"),
    ],
)
def test_partition_override_is_validated(text, match):
    with pytest.raises(ValueError, match=match):
        partition_layers(7, 3, text)
    assert partition_layers(7, 3, "1,1,5") == [(0, 1), (1, 2), (2, 7)]


def test_partition_env_override(monkeypatch):
    monkeypatch.setenv("PIPESERVE_PP_LAYER_PARTITION", "3,2")
    assert partition_layers(5, 2) == [(0, 3), (3, 5)]


def test_stages_build_only_their_layers_and_weights(tied_llama):
    full = _stage(tied_llama, 0, 1)
    first, last = _stage(tied_llama, 0, 2), _stage(tied_llama, 1, 2)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # the odd layer goes to stage 0: the last stage also runs the lm_head
    assert head_cost_in_layers(full.cfg) > 0
    assert (first.start, first.end, last.start, last.end) == (0, 3, 3, 5)
    assert first.lm_head is None and first.norm is None and last.embed_tokens is None
    per_layer = n(full.layers[0])
    assert n(first) == n(full.embed_tokens) + 3 * per_layer
    assert n(last) == n(full.lm_head) + n(full.norm) + 2 * per_layer
    # Tied embeddings: the last stage, which has no embedding, loaded the embedding into its lm_head.
    assert torch.equal(last.lm_head.weight, full.embed_tokens.weight)
    assert torch.equal(last.layers[0].mlp.down_proj.weight, full.layers[3].mlp.down_proj.weight)


def test_default_partition_counts_the_lm_head(tmp_path):
    """Layers leave the last stage while that lowers the largest share of work (head included)."""
    assert partition_layers(32, 2, "", head_layers=2.4) == [(0, 17), (17, 32)]
    assert partition_layers(16, 2, "", head_layers=1.08) == [(0, 9), (9, 16)]
    assert partition_layers(32, 4, "", head_layers=2.4) == [(0, 9), (9, 18), (18, 26), (26, 32)]
    assert partition_layers(16, 2, "", head_layers=0.5) == [(0, 8), (8, 16)]  # no gain in moving
    assert partition_layers(2, 2, "", head_layers=9.0) == [(0, 1), (1, 2)]  # one layer at least
    assert partition_layers(32, 2, "20,12", head_layers=2.4) == [(0, 20), (20, 32)]  # as asked
    # the 8B shape of the benchmarks: hidden 4096, 32 heads, 8 KV heads, inter 14336, vocab 128256
    shape = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8}
    shape |= {"intermediate_size": 14336, "vocab_size": 128256, "num_hidden_layers": 32}
    raw = {**ModelConfig.from_dir(make_checkpoint(str(tmp_path), "llama", layers=1)).raw}
    cfg = ModelConfig.from_dict({**raw, **shape, "head_dim": 128})
    assert 2.3 < head_cost_in_layers(cfg) < 2.5
    assert stage_layers(cfg, 2) == [(0, 17), (17, 32)]


def test_tp_requires_divisible_heads(tmp_path):
    raw = ModelConfig.from_dir(make_checkpoint(str(tmp_path), "llama", layers=1)).raw
    ctx = ParallelContext(tp_rank=0, tp_size=4)
    cases = [
        (
            {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8},
            "num_attention_heads .6. is not divisible by tp_size .4.",
        ),
        ({"num_key_value_heads": 2}, "num_key_value_heads .2. is not divisible by tp_size .4."),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            build_stage_model(
                ModelConfig.from_dict({**raw, **change}), ctx, torch.float32, torch.device("cpu")
            )


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf = LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        rope_scaling=scaling,
        rope_theta=500000.0,
        max_position_embeddings=131072,
    )
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    raw = {**hf.to_dict(), "architectures": ["LlamaForCausalLM"]}
    got = inverse_frequencies(128, ModelConfig.from_dict(raw).rope)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_merged_parameter_missing_one_shard_is_refused_naming_the_tensor(tmp_path):
    """q/k/v fill one qkv_proj and gate/up one gate_up_proj: a checkpoint that lacks one of them
    (or a bias) must not load with uninitialised rows."""
    import os

    from safetensors.torch import load_file, save_file

    path = make_checkpoint(str(tmp_path), "qwen2", layers=2)
    cfg = ModelConfig.from_dir(path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    for name in (
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.bias",
        "model.layers.0.mlp.up_proj.weight",
    ):
        del tensors[name]
    save_file(tensors, file)
    model = build_stage_model(cfg, ParallelContext(), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="lacks 3 tensor") as err:
        load_weights(model, path)
    for name in ("layers.1.self_attn.k_proj.weight", "0.self_attn.v_proj.bias", "0.mlp.up_proj"):
        assert name in str(err.value)
