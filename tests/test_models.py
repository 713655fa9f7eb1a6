"""Fidelity of the model implementations against shared/spec/models.md."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.fx
from torch.utils._python_dispatch import TorchDispatchMode

import models
from conftest import REPO, run_script
from models import create_model, model_info
from models.cs_mixer import SpatialChannelMixer, group_tokens, ungroup_tokens
from models.s2mlpv2 import shift1, shift2

# The spec's targets: parameters and GMACs at 224², batch 1 (conv/linear/matmul MACs).
SPEC = {
    "cs_mixer_t": (25_387_288, 2.390), "cs_mixer_s": (32_183_800, 4.190),
    "cs_mixer_b": (55_936_888, 7.767), "cs_mixer_l": (94_187_688, 13.709),
    "s2mlpv2_small": (25_133_416, 6.902), "s2mlpv2_medium": (55_303_976, 16.284),
}


def test_registry_lists_every_variant():
    assert models.list_models() == sorted([*SPEC, "cs_mixer_tiny", "cs_mixer_mini", "s2mlpv2_tiny"])


def test_models_json_matches_spec_counts():
    result = run_script("-m", "models", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    for name, (params, gmacs) in SPEC.items():
        assert abs(rows[name]["params"] - params) / params < 0.005, (name, rows[name]["params"], params)
        assert abs(rows[name]["gmacs"] - gmacs) / gmacs < 0.01, (name, rows[name]["gmacs"], gmacs)


def test_models_table_shows_paper_figures():
    result = run_script("-m", "models")
    assert result.returncode == 0, result.stderr
    line = next(row for row in result.stdout.splitlines() if row.startswith("cs_mixer_l "))
    assert "94,187,688" in line and "13.709" in line and "94 M" in line and "83.2 %" in line


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SPEC))
def test_full_size_forward_backward_at_224(name):
    torch.manual_seed(0)
    model = models.create_model(name, drop_path=0.0)  # else dropped branches get zero gradients
    x = torch.randn(2, 3, 224, 224)
    out = model(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.logsumexp(dim=1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() > 0 for g in grads) == len(grads)  # every parameter is used


# Both aggregations: cs_mixer_tiny with 2 blocks per stage at 64 px has global (dilated) blocks in
# stages 1 and 2 (sides 16 and 8 > group 4), and local ones everywhere.
BATCH_CASES = [("cs_mixer_tiny", dict(img_size=64, depths=(2, 2, 2, 2))), ("s2mlpv2_tiny", dict(img_size=32))]


@pytest.mark.parametrize("name, overrides", BATCH_CASES)
def test_sample_output_independent_of_rest_of_batch(name, overrides):
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10, **overrides).eval()
    size = overrides["img_size"]
    x = torch.randn(4, 3, size, size)
    y = x.clone()
    y[1:] = torch.randn(3, 3, size, size) * 3
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[1:], b[1:], atol=1e-3)


def test_global_blocks_exist_where_expected():
    model = models.create_model("cs_mixer_tiny", img_size=64, depths=(2, 2, 2, 2))
    kinds = [[(b.group_size, b.dilated) for b in stage[1:]] for stage in model.stages]
    assert kinds == [[(4, False), (4, True)], [(4, False), (4, True)], [(4, False), (4, False)],
                     [(2, False), (2, False)]]


@pytest.mark.parametrize("dilated", [False, True])
def test_grouping_is_exact_and_inverse(dilated):
    b, h, w, c, g = 2, 8, 12, 3, 4
    x = torch.arange(b * h * w * c, dtype=torch.float32).view(b, h, w, c)
    groups = group_tokens(x, g, dilated)
    assert groups.shape == (b * h * w // g ** 2, g * g, c)
    torch.testing.assert_close(ungroup_tokens(groups, g, dilated, h, w), x, rtol=0, atol=0)
    # Each group's tokens, as (sample, row, col), follow the spec's layout.
    sample, row, col = (t.view(b, h, w) for t in torch.meshgrid(
        torch.arange(b), torch.arange(h), torch.arange(w), indexing="ij"))
    coords = torch.stack([sample, row, col], dim=-1).float()
    grouped = group_tokens(coords, g, dilated)
    assert (grouped[..., 0] == grouped[:, :1, 0]).all(), "a group mixes samples"
    first = grouped[0]
    if dilated:  # tokens spaced H/g, W/g apart
        assert first[:, 1].unique().tolist() == [0, 2, 4, 6] and first[:, 2].unique().tolist() == [0, 3, 6, 9]
    else:  # a contiguous g x g window
        assert first[:, 1].unique().tolist() == [0, 1, 2, 3] and first[:, 2].unique().tolist() == [0, 1, 2, 3]


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] = self.ops.get(func.overloadpacket.__name__, 0) + 1
        return func(*args, **(kwargs or {}))


def test_mixer_is_one_batched_matmul_per_block():
    mixer = SpatialChannelMixer(dim=16, tokens=9, num_heads=4, head_dim=2)
    mixer.reset_parameters()
    with torch.no_grad(), _CountOps() as counter:
        mixer(torch.randn(6, 9, 16))
    assert counter.ops.get("baddbmm") == 1 and "bmm" not in counter.ops
    # and the result equals the per-head definition z_m = vec(V_m) M_m + beta_m
    x = torch.randn(5, 9, 16)
    v = mixer.v(x).view(5, 9, 4, 2)
    z = torch.stack([v[:, :, m, :].reshape(5, 18) @ mixer.mix_weight[m] + mixer.mix_bias[m, 0]
                     for m in range(4)], dim=2)                       # (n, L*d, h)
    z = z.view(5, 9, 2, 4).permute(0, 1, 3, 2).reshape(5, 9, 8)
    expected = mixer.o(mixer.u(x) * mixer.p(z))
    torch.testing.assert_close(mixer(x), expected, rtol=1e-5, atol=1e-6)


def test_mixer_init_starts_near_proj_u():
    model = models.create_model("cs_mixer_tiny")
    for m in (m for m in model.modules() if isinstance(m, SpatialChannelMixer)):
        assert (m.p.bias == 1).all() and m.p.weight.abs().max() <= 1e-3 / m.tokens
        assert (m.mix_bias == 0).all() and 0.01 < m.mix_weight.std() < 0.03
    assert all(n.endswith("mix_bias") for n in model.no_weight_decay()) and model.no_weight_decay()


def _slow_shift(x: torch.Tensor, moves) -> torch.Tensor:
    """Obviously-correct reference: per-element loops, edge replication at the vacated border."""
    b, h, w, c = x.shape
    out = torch.empty_like(x)
    size = c // 4
    for ch in range(c):
        axis, step = moves[ch // size]
        for i in range(h):
            for j in range(w):
                si, sj = (i - step, j) if axis == "H" else (i, j - step)
                si, sj = min(max(si, 0), h - 1), min(max(sj, 0), w - 1)
                out[:, i, j, ch] = x[:, si, sj, ch]
    return out


def test_shifts_match_loop_reference():
    x = torch.randn(2, 5, 6, 8)
    ref1 = _slow_shift(x, [("W", 1), ("W", -1), ("H", 1), ("H", -1)])
    ref2 = _slow_shift(x, [("H", 1), ("H", -1), ("W", 1), ("W", -1)])
    torch.testing.assert_close(shift1(x), ref1, rtol=0, atol=0)
    torch.testing.assert_close(shift2(x), ref2, rtol=0, atol=0)
    # edge replication: the vacated first column of group 0 keeps its value
    torch.testing.assert_close(shift1(x)[:, :, 0, :2], x[:, :, 0, :2], rtol=0, atol=0)
    assert shift1(x).data_ptr() != x.data_ptr()


@pytest.mark.parametrize("name", ["cs_mixer_tiny", "s2mlpv2_tiny"])
def test_bf16_autocast_forward(name):
    model = models.create_model(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 10) and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), model(x), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("name, overrides, message", [
    ("cs_mixer_t", dict(img_size=200), "stage 1 has side 50, not divisible by group size 7"),
    ("cs_mixer_t", dict(img_size=112), "stage 4 downsamples a side of 7, which is odd"),
    ("cs_mixer_tiny", dict(img_size=48, group_size=8), "stage 1 has side 12, not divisible by group size 8"),
    ("cs_mixer_t", dict(img_size=226), "img_size 226 is not divisible by the stem's stride 4"),
    ("s2mlpv2_small", dict(img_size=220), "stage 1: img_size 220 is not divisible by the patch size 7"),
    ("s2mlpv2_small", dict(img_size=231), "stage 2 downsamples a side of 33, which is odd"),
])
def test_invalid_geometry_fails_at_construction(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        models.create_model(name, **overrides)


def test_create_model_overrides():
    m = models.create_model("s2mlpv2_tiny", num_classes=7, img_size=64, drop_path=0.2)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert m.stages[-1][-1].drop_path.p == pytest.approx(0.2) and m.stages[0][1].drop_path.p == 0  # [0]: the downsample slot
    with pytest.raises(TypeError, match="unknown override.*heads"):
        models.create_model("cs_mixer_tiny", heads=3)
    m.reset_classifier(3)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert m.forward_head(m.forward_features(torch.randn(1, 3, 64, 64)), pre_logits=True).shape == (1, 128)


@pytest.mark.parametrize("name", ["cs_mixer_tiny", "s2mlpv2_tiny"])
def test_stochastic_depth_off_in_eval_and_output_deterministic(name):
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10, drop_path=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))  # stochastic depth is active in training


@pytest.mark.parametrize("name", ["cs_mixer_tiny", "s2mlpv2_tiny"])
def test_grad_checkpointing_gives_the_same_gradients_with_less_activation_memory(name):
    """timm's set_grad_checkpointing: per-block recomputation, drop-path draws replayed identically."""
    sys.path.insert(0, str(REPO / "launch"))
    from bench_model import activation_mb_per_image

    torch.manual_seed(0)
    model = models.create_model(name, drop_path=0.1)
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    model.set_grad_checkpointing(False)
    full = activation_mb_per_image(model, 32, False, torch.device("cpu"))
    model.set_grad_checkpointing(True)
    checkpointed = activation_mb_per_image(model, 32, False, torch.device("cpu"))
    print(f"{name}: {full:.3f} -> {checkpointed:.3f} MB of saved activations per image")
    assert checkpointed < 0.3 * full


FULL_SIZE = ["cs_mixer_t", "cs_mixer_s", "cs_mixer_b", "cs_mixer_l", "s2mlpv2_small", "s2mlpv2_medium"]


@pytest.mark.parametrize("name", FULL_SIZE)
def test_feature_pyramid_of_every_full_size_variant(name):
    """features_only=True (timm's convention): the stages' maps, NCHW, their channels and reductions as
    feature_info says (built and run on the meta device: shapes without compute). S2-MLPv2 has two stages; its
    patch embedding is level 0, as timm exposes a CNN's stem."""
    with torch.device("meta"):
        backbone = create_model(name, features_only=True)
        maps = backbone(torch.empty(2, 3, 224, 224))
    info = backbone.feature_info
    print(name, "channels", info.channels(), "reductions", info.reduction())
    expected = {"cs_mixer_t": [64, 128, 256, 512], "cs_mixer_s": [96, 192, 384, 768], "cs_mixer_b": [96, 192, 384, 768],
                "cs_mixer_l": [128, 256, 512, 1024], "s2mlpv2_small": [192, 192, 384],
                "s2mlpv2_medium": [256, 256, 512]}[name]
    assert info.channels() == expected
    assert info.reduction() == ([4, 8, 16, 32] if name.startswith("cs_mixer") else [7, 7, 14])
    assert [tuple(m.shape) for m in maps] == [(2, c, 224 // r, 224 // r) for c, r in zip(expected, info.reduction())]
    last = create_model(name, features_only=True, out_indices=(-1,)).feature_info  # out_indices, timm's way
    assert last.channels() == expected[-1:]


@pytest.mark.parametrize("name", ["cs_mixer_tiny", "s2mlpv2_tiny"])
def test_the_timm_model_api(name):
    """forward_features / forward_head(pre_logits), reset_classifier(n, global_pool), forward_intermediates,
    prune_intermediate_layers, pretrained_cfg from the model table, torch.fx tracing and TorchScript."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    cfg = model.pretrained_cfg
    assert cfg is model.default_cfg and cfg["input_size"] == (3, 32, 32) and cfg["classifier"] == "head"
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == model_info(name).crop_pct
    first = (cfg["first_conv"],) if isinstance(cfg["first_conv"], str) else cfg["first_conv"]
    assert all(f"{c}.weight" in model.state_dict() for c in first)
    features = model.forward_features(x)  # channels-last, as output_fmt says
    assert model.output_fmt == "NHWC" and features.shape[1:3] == cfg["pool_size"]
    assert features.shape[-1] == model.num_features == model.head_hidden_size
    pre = model.forward_head(features, pre_logits=True)
    assert torch.equal(model(x), model.get_classifier()(pre))
    final, stages = model.forward_intermediates(x)
    assert torch.equal(final, features) and len(stages) == len(model.feature_info)
    assert [s.shape[1] for s in stages] == model.feature_info.channels()
    assert torch.equal(model.forward_intermediates(x, indices=1, intermediates_only=True)[0], stages[-1])
    traced = torch.fx.symbolic_trace(model)
    assert torch.equal(traced(x), model(x))
    assert torch.allclose(torch.jit.script(model)(x), model(x), atol=1e-6)
    model.reset_classifier(0)
    assert model.num_classes == 0 and torch.equal(model(x), pre)
    model.reset_classifier(0, "")  # no pooling: the unpooled map
    assert torch.equal(model(x), features) and not model.head.training  # the new head follows eval()
    unpooled = create_model(name, num_classes=0, global_pool="")
    assert unpooled(x).ndim == 4
    kept = model.prune_intermediate_layers([0], prune_norm=True)  # level 0: S2-MLPv2's stem, CS-Mixer's stage 1
    assert kept == [0] and len(model.stages) == (0 if model.stem_is_feature else 1) and len(model.feature_info) == 1
    with pytest.raises(ValueError, match="global_pool 'mean'"):
        create_model(name, global_pool="mean")
