"""CAT matches the paper's published configurations and its attention blocks mean what they say."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mm_encoder.cat import (CAT, CATConfig, CrossPatchAttention, InnerPatchAttention, cat_base,
                            cat_micro, cat_small, cat_tiny, load_cat_checkpoint, to_patches,
                            from_patches)

PAPER = {"tiny": (cat_tiny, 17e6, 2.8e9, 512), "small": (cat_small, 37e6, 5.9e9, 768),
         "base": (cat_base, 52e6, 8.9e9, 768)}


@pytest.mark.parametrize("name", list(PAPER))
def test_published_variants_shapes_params_and_flops(name):
    factory, params, flops, width = PAPER[name]
    torch.manual_seed(0)
    model = factory().eval()
    assert abs(model.num_params() / params - 1) <= 0.02, model.num_params()
    assert abs(model.flops() / flops - 1) <= 0.04, model.flops()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (2, 1000)
        assert model.forward_features(x).shape == (2, width)  # pooled 8C


def test_ipsa_equals_windowed_multihead_attention_with_copied_weights():
    torch.manual_seed(0)
    dim, heads, p = 32, 4, 4
    ipsa = InnerPatchAttention(dim, heads, p)
    nn.init.normal_(ipsa.rel_bias, std=0.5)
    mha = nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(ipsa.qkv.weight)
        mha.in_proj_bias.copy_(ipsa.qkv.bias)
        mha.out_proj.weight.copy_(ipsa.proj.weight)
        mha.out_proj.bias.copy_(ipsa.proj.bias)
    x = torch.randn(2, 8, 8, dim)
    windows = to_patches(x, p)                                       # (2*4, 16, dim)
    bias = ipsa.bias().detach()                                      # (heads, 16, 16)
    mask = bias.repeat(windows.shape[0], 1, 1)                       # added to the scores
    ref, _ = mha(windows, windows, windows, attn_mask=mask, need_weights=False)
    expected = from_patches(ref, p, 2, 8, 8)
    torch.testing.assert_close(ipsa(x), expected, rtol=1e-5, atol=1e-5)


def test_cpsa_commutes_with_a_permutation_of_channels():
    torch.manual_seed(0)
    cpsa = CrossPatchAttention(p=4)
    x = torch.randn(2, 8, 8, 24)
    perm = torch.randperm(24)
    torch.testing.assert_close(cpsa(x[..., perm]), cpsa(x)[..., perm])
    # Its weights are shared across channels: the parameter count does not depend on C.
    assert sum(p.numel() for p in cpsa.parameters()) == 16 * 48 + 48 + 16 * 16 + 16


def test_cpsa_mixes_patches():
    torch.manual_seed(0)
    cpsa = CrossPatchAttention(p=4)
    x = torch.randn(1, 8, 8, 3)
    y = x.clone()
    y[:, :4, :4] += 1.0  # change only the first patch
    out_x, out_y = cpsa(x), cpsa(y)
    assert not torch.allclose(out_x[:, 4:, 4:], out_y[:, 4:, 4:])  # other patches see it


def test_small_cat_trains_on_a_tiny_task():
    torch.manual_seed(0)
    model = cat_micro(img_size=32, num_classes=2)
    # Class = a square in the red channel vs in the blue channel, anywhere in the image.
    x = torch.randn(64, 3, 32, 32) * 0.3
    y = torch.randint(0, 2, (64,))
    pos = torch.randint(0, 24, (64, 2))
    for i in range(64):
        r, c = pos[i].tolist()
        x[i, 0 if y[i] == 0 else 2, r:r + 8, c:c + 8] += 1.0
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match="does not divide into"):
        CAT(CATConfig(img_size=40, patch=7))


def _to_official(sd: dict, cfg: CATConfig) -> dict:
    """Our keys → the released CAT code's keys (written independently of the loader)."""
    out = {}
    slots = ["pre_ipsa_blocks", "cpsa_blocks", "post_ipsa_blocks"]
    for k, v in sd.items():
        if k.startswith("stages."):
            _, i, blk, rest = k.split(".", 3)
            k = f"layers.{i}.{slots[int(blk) % 3]}.{int(blk) // 3}.{rest}"
        elif k.startswith("merges."):
            k = "layers." + k.split(".", 2)[1] + ".downsample." + k.split(".", 2)[2]
        elif k.startswith("patch_embed."):
            k = "patch_embed.proj." + k[len("patch_embed."):]
        elif k.startswith("patch_norm."):
            k = "patch_embed.norm." + k[len("patch_norm."):]
        elif k == "pos_embed":
            v = v.reshape(1, -1, v.shape[-1])
            k = "ape"
        out[k.replace("rel_bias", "relative_position_bias_table")] = v
    return out


def test_loads_own_and_official_checkpoint_layouts(tmp_path):
    torch.manual_seed(0)
    src = cat_micro(img_size=32, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.save(src.state_dict(), tmp_path / "ours.pth")
    torch.save({"model": _to_official(src.state_dict(), src.cfg)}, tmp_path / "official.pth")
    for name in ("ours.pth", "official.pth"):
        dst = cat_micro(img_size=32, num_classes=5).eval()
        assert load_cat_checkpoint(dst, str(tmp_path / name)) == []
        torch.testing.assert_close(dst(x), src(x))
    with pytest.raises(KeyError, match="does not match"):
        load_cat_checkpoint(cat_micro(img_size=32, num_classes=7), str(tmp_path / "ours.pth"))
