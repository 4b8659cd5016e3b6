"""CAT: Cross Attention in Vision Transformer (Lin et al., arXiv 2106.05786).

Written from the paper and its published configurations:

    image (B, 3, H, W)
      └ patch embedding: conv 4x4 stride 4 → C channels, LayerNorm, + absolute position embedding
      └ stage 1..4 at 1/4, 1/8, 1/16, 1/32 resolution, widths C, 2C, 4C, 8C
          each stage: depth units of three pre-norm blocks  IPSA → CPSA → IPSA  (own MLP each)
          between stages: 2x2 patch merging (concat 4C → LayerNorm → linear 2C, no bias)
      └ head: LayerNorm → mean over tokens → linear

IPSA (inner-patch self-attention) is multi-head attention among the p x p pixels of each patch,
with a learned relative position bias of (2p-1)^2 x heads: windowed attention without shift.
CPSA (cross-patch self-attention) treats every channel separately: the tokens are the patches of
that single-channel map, each token the p*p values of one patch, attended by one head of width
p*p whose qkv and output projections are shared by all channels; no position bias.

Inputs of any size work as long as every stage's map divides into patches: a stage whose map is
smaller than ``patch`` uses the whole map as one patch (at 224 the last stage is exactly that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class CATConfig:
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 64                                  # C
    depths: tuple[int, ...] = (1, 1, 3, 1)               # depth units per stage
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    patch: int = 7                                       # p: IPSA/CPSA patch side
    stem_stride: int = 4                                 # patch embedding conv kernel/stride
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    abs_pos: bool = True
    extra: dict = field(default_factory=dict)

    def stage_resolutions(self) -> list[int]:
        return stage_resolutions(self.img_size, self.stem_stride, len(self.depths))

    def stage_patches(self) -> list[int]:
        return [min(self.patch, r) for r in self.stage_resolutions()]

    def validate(self) -> None:
        check_stages(self.img_size, self.stem_stride, self.stage_resolutions(),
                     self.stage_patches(), "patches")


def stage_resolutions(img_size: int, stem_stride: int, stages: int) -> list[int]:
    """The side of each stage's map: the stem divides by its stride, each merge by 2."""
    r = img_size // stem_stride
    return [r // (2 ** i) for i in range(stages)]


def check_stages(img_size: int, stem_stride: int, resolutions: list[int], sides: list[int],
                 unit: str) -> None:
    """Raise ValueError unless every stage's map divides into ``sides``-wide squares."""
    if img_size % stem_stride:
        raise ValueError(f"img_size {img_size} is not a multiple of the stem stride "
                         f"{stem_stride}")
    for i, (r, p) in enumerate(zip(resolutions, sides)):
        if r < 1 or r % p:
            raise ValueError(f"stage {i + 1}: a {r}x{r} map does not divide into {p}x{p} "
                             f"{unit}; pick img_size so that every stage's map does")


# ----------------------------------------------------------------------------- helpers


def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, H, W, C) → (B * nH * nW, p*p, C)"""
    B, H, W, C = x.shape
    x = x.view(B, H // p, p, W // p, p, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, p * p, C)


def from_patches(x: torch.Tensor, p: int, B: int, H: int, W: int) -> torch.Tensor:
    """(B * nH * nW, p*p, C) → (B, H, W, C)"""
    C = x.shape[-1]
    x = x.view(B, H // p, W // p, p, p, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------- attention


class InnerPatchAttention(nn.Module):
    """IPSA: multi-head self-attention among the p*p pixels of each patch, relative pos. bias."""

    def __init__(self, dim: int, heads: int, p: int, qkv_bias: bool = True):
        super().__init__()
        self.dim, self.heads, self.p = dim, heads, p
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_bias = nn.Parameter(torch.zeros((2 * p - 1) ** 2, heads))
        nn.init.trunc_normal_(self.rel_bias, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij"))
        coords = coords.flatten(1)                                  # (2, p*p)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (p - 1)
        self.register_buffer("rel_index", rel[..., 0] * (2 * p - 1) + rel[..., 1],
                             persistent=False)                      # (p*p, p*p)

    def bias(self) -> torch.Tensor:
        """(heads, p*p, p*p) additive attention bias."""
        n = self.p * self.p
        return self.rel_bias[self.rel_index.view(-1)].view(n, n, self.heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → (B, H, W, C)"""
        B, H, W, C = x.shape
        t = to_patches(x, self.p)                                   # (B*nP, n, C)
        n = t.shape[1]
        qkv = self.qkv(t).view(-1, n, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                            # (B*nP, heads, n, d)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.bias()
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, C)
        return from_patches(self.proj(out), self.p, B, H, W)


class CrossPatchAttention(nn.Module):
    """CPSA: per channel, single-head attention across patches; a token is one patch's p*p
    values of that channel. Projections are shared by all channels."""

    def __init__(self, p: int, qkv_bias: bool = True):
        super().__init__()
        self.p = p
        width = p * p
        self.scale = width ** -0.5
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → (B, H, W, C)"""
        B, H, W, C = x.shape
        p = self.p
        nP = (H // p) * (W // p)
        t = to_patches(x, p).view(B, nP, p * p, C).permute(0, 3, 1, 2)   # (B, C, nP, p*p)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        attn = (q * self.scale) @ k.transpose(-2, -1)                    # (B, C, nP, nP)
        out = self.proj(attn.softmax(-1) @ v)                            # (B, C, nP, p*p)
        out = out.permute(0, 2, 3, 1).reshape(B * nP, p * p, C)
        return from_patches(out, p, B, H, W)


class Block(nn.Module):
    """Pre-norm transformer block around IPSA or CPSA, with its own MLP."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attn
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):                                            # (B, H, W, C)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (4C) → LayerNorm → linear to 2C without bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):                                            # (B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.reduction(self.norm(x))                          # (B, H/2, W/2, 2C)


def init_weights(m: nn.Module) -> None:
    """Truncated-normal linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class HierarchicalBackbone(nn.Module):
    """What CAT and MlTr share around their stages: conv stem + LayerNorm (+ absolute position
    embedding), the stages with patch merging between them, final LayerNorm, mean pooling, a
    linear head. Subclasses call :meth:`_stem`, then :meth:`_add_stage` once per stage (in
    order, so parameters are created in the same order whatever the subclass), then
    :meth:`_finish`."""

    pos_embed: nn.Parameter | None

    def _stem(self, cfg, pos: bool) -> None:
        C, s = cfg.embed_dim, cfg.stem_stride
        self.patch_embed = nn.Conv2d(cfg.in_chans, C, kernel_size=s, stride=s)
        self.patch_norm = nn.LayerNorm(C)
        r0 = cfg.stage_resolutions()[0]
        self.pos_embed = nn.Parameter(torch.zeros(1, r0, r0, C)) if pos else None
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.stages, self.merges = nn.ModuleList(), nn.ModuleList()

    def _add_stage(self, blocks: list[nn.Module], dim: int, last: bool) -> None:
        self.stages.append(nn.Sequential(*blocks))
        if not last:
            self.merges.append(PatchMerging(dim))

    def _finish(self, cfg) -> None:
        self.num_features = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes else \
            nn.Identity()
        self.apply(init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → pooled (B, 8C) feature (after the final LayerNorm)."""
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))  # (B, H/s, W/s, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.merges):
                x = self.merges[i](x)
        return self.norm(x).mean(dim=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class CAT(HierarchicalBackbone):
    def __init__(self, cfg: CATConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C = cfg.embed_dim
        self._stem(cfg, pos=cfg.abs_pos)
        n_blocks = 3 * sum(cfg.depths)
        rates = torch.linspace(0, cfg.drop_path, n_blocks).tolist()
        k = 0
        for i, (units, heads, p) in enumerate(zip(cfg.depths, cfg.num_heads,
                                                  cfg.stage_patches())):
            dim = C * 2 ** i
            blocks = []
            for _ in range(units):
                for kind in ("ipsa", "cpsa", "ipsa"):
                    attn = (InnerPatchAttention(dim, heads, p, cfg.qkv_bias) if kind == "ipsa"
                            else CrossPatchAttention(p, cfg.qkv_bias))
                    blocks.append(Block(dim, attn, cfg.mlp_ratio, rates[k]))
                    k += 1
            self._add_stage(blocks, dim, last=i == len(cfg.depths) - 1)
        self._finish(cfg)

    def flops(self) -> int:
        """Analytic multiply-adds of one forward pass (the paper's convention): linear layers,
        convolutions and attention matmuls; norms, softmax and activations are not counted."""
        cfg = self.cfg
        C, s = cfg.embed_dim, cfg.stem_stride
        res = cfg.stage_resolutions()
        total = res[0] ** 2 * C * cfg.in_chans * s * s                 # patch embedding
        for i, (units, p) in enumerate(zip(cfg.depths, cfg.stage_patches())):
            d, n = C * 2 ** i, res[i] ** 2
            n_patches = n // (p * p)
            hidden = int(d * cfg.mlp_ratio)
            mlp = 2 * n * d * hidden
            ipsa = 4 * n * d * d + 2 * n * (p * p) * d + mlp            # qkv+proj, QK^T+AV
            w = p * p
            cpsa = d * (n_patches * w * 4 * w + 2 * n_patches * n_patches * w) + mlp
            total += units * (2 * ipsa + cpsa)
            if i < len(cfg.depths) - 1:
                total += (n // 4) * 4 * d * 2 * d                      # patch merging
        if cfg.num_classes:
            total += self.num_features * cfg.num_classes
        return int(total)


def cat_tiny(**kw) -> CAT:
    """CAT-T: C=64, depth units [1,1,3,1], heads [2,4,8,16] (paper: 17M params, 2.8G FLOPs)."""
    return CAT(CATConfig(embed_dim=64, depths=(1, 1, 3, 1), num_heads=(2, 4, 8, 16), **kw))


def cat_small(**kw) -> CAT:
    """CAT-S: C=96, depth units [1,1,3,1], heads [3,6,12,24] (paper: 37M, 5.9G)."""
    return CAT(CATConfig(embed_dim=96, depths=(1, 1, 3, 1), num_heads=(3, 6, 12, 24), **kw))


def cat_base(**kw) -> CAT:
    """CAT-B: C=96, depth units [1,1,6,1], heads [3,6,12,24] (paper: 52M, 8.9G)."""
    return CAT(CATConfig(embed_dim=96, depths=(1, 1, 6, 1), num_heads=(3, 6, 12, 24), **kw))


def cat_micro(img_size: int = 32, num_classes: int = 0, **kw) -> CAT:
    """A small CAT for small images (the synthetic world's 32 px): stem stride 2, patch 4,
    C=32, two depth units over three stages."""
    return CAT(CATConfig(img_size=img_size, num_classes=num_classes, embed_dim=32,
                         depths=(1, 1, 1), num_heads=(1, 2, 4), patch=4, stem_stride=2, **kw))


# The released CAT code names modules differently; map its keys onto ours.
_OFFICIAL_PREFIXES = [
    ("patch_embed.proj.", "patch_embed."),
    ("patch_embed.norm.", "patch_norm."),
]
_UNIT_SLOT = {"pre_ipsa_blocks": 0, "cpsa_blocks": 1, "post_ipsa_blocks": 2}


def official_key(key: str) -> str | None:
    """An official CAT state-dict key in this module's naming (None: not a parameter here)."""
    if key.endswith("relative_position_index"):
        return None  # a buffer this class recomputes
    for a, b in _OFFICIAL_PREFIXES:
        if key.startswith(a):
            return b + key[len(a):]
    if key == "ape":
        return "pos_embed"
    key = key.replace("relative_position_bias_table", "rel_bias")
    parts = key.split(".")
    if parts[0] == "layers":
        if parts[2] in _UNIT_SLOT:   # layers.i.<kind>_blocks.j.rest → stages.i.(3j+slot).rest
            k = 3 * int(parts[3]) + _UNIT_SLOT[parts[2]]
            return ".".join(["stages", parts[1], str(k), *parts[4:]])
        if parts[2] == "downsample":
            return ".".join(["merges", parts[1], *parts[3:]])
    return key


def load_cat_checkpoint(model: CAT, path: str, strict: bool = True) -> list[str]:
    """Load a checkpoint saved by this class or by the official CAT code (its key layout:
    ``layers.<i>.{pre_ipsa,cpsa,post_ipsa}_blocks.<j>``, ``ape``, ``patch_embed.proj``).

    Accepts a raw state dict or ``{"model": state_dict}`` / ``{"state_dict": ...}``. With
    ``strict`` a mismatch raises ``KeyError`` naming the first unmatched keys; otherwise the
    missing keys are returned.
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and ("model" in obj or "state_dict" in obj):
        obj = obj.get("model", obj.get("state_dict"))
    official = any(k.startswith("layers.") for k in obj)
    sd = {}
    for k, v in obj.items():
        name = official_key(k) if official else k
        if name is not None:
            sd[name] = v
    if "pos_embed" in sd and model.pos_embed is not None and sd["pos_embed"].dim() == 3:
        r = math.isqrt(sd["pos_embed"].shape[1])
        sd["pos_embed"] = sd["pos_embed"].reshape(1, r, r, -1)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
             if k in own and own[k].shape != v.shape]
    if wrong:
        raise KeyError(f"checkpoint {path} does not match this CAT: shapes differ for "
                       f"{', '.join(wrong[:3])}")
    res = model.load_state_dict(sd, strict=False)
    if strict and (res.missing_keys or res.unexpected_keys):
        raise KeyError(f"checkpoint {path} does not match this CAT: missing "
                       f"{res.missing_keys[:5]}, unexpected {res.unexpected_keys[:5]}")
    return list(res.missing_keys)
