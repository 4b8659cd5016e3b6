"""The item encoder: frozen tower features → fusion → projection to the item embedding (D),
L2-normalised.

Modalities are ``text`` (always: title, text and tags), ``image`` and ``video`` (frames through
the image tower: the mean frame feature and the last-minus-first difference). A missing modality
is *absent*, not zeros pretending to be data: the fusion averages only the modalities an item has
(a presence mask), each with its own projection and a learned modality embedding.

At initialisation the fusion's residual MLP is zero, so the embedding is a seeded random
projection of the (normalised) tower features: it preserves the towers' own similarity structure,
i.e. the CV/NLP view of the item — the "unmatched" starting point that alignment then trains.

The encoder's config and fusion weights are one versioned artifact (:meth:`ItemEncoder.save`);
the version is a hash of both, so equal content means equal version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from mm_encoder.config import ItemEncoderConfig

log = logging.getLogger(__name__)

MODALITIES = ("text", "image", "video")


def item_text(title: str, text: Optional[str], tags: Optional[Sequence[str]]) -> str:
    parts = [title or ""]
    if text:
        parts.append(text)
    if tags is not None and len(tags):
        parts.append("tags: " + ", ".join(tags))
    return ". ".join(parts)


class Towers:
    """The configured frozen towers, built once (they hold the pretrained weights)."""

    def __init__(self, cfg: ItemEncoderConfig):
        from mm_encoder import towers as T

        self.cfg = cfg
        clip = T.CLIPTowers(cfg.clip_path) if "clip" in (cfg.text_tower, cfg.image_tower) else None
        if cfg.text_tower == "clip":
            self.text = T.CLIPTextTower(clip)
        else:
            path = None if cfg.text_tower == "minilm" else cfg.text_tower
            self.text = T.TextTower(path, max_length=cfg.text_max_length)
        if cfg.image_tower == "none":
            self.image = None
        elif cfg.image_tower == "mobilenet_v2":
            self.image = T.MobileNetV2Tower(image_size=cfg.image_size)
        elif cfg.image_tower == "cat":
            self.image = T.CATTower(cfg.cat_checkpoint, cfg.cat_variant, cfg.image_size)
        elif cfg.image_tower == "clip":
            self.image = T.CLIPImageTower(clip)
        elif cfg.image_tower == "tagger":
            self.image = T.TaggerTower(cfg.tagger_path)
        else:
            raise ValueError(f"encoder.image_tower must be mobilenet_v2, cat, clip, tagger or "
                             f"none, got "
                             f"{cfg.image_tower!r}")

        self.video = None
        if cfg.video and self.image is not None and cfg.video_tower == "camoe":
            from mm_encoder.camoe import CAMoEError, load_video_text

            if not cfg.camoe_path:
                raise CAMoEError("encoder.video_tower is camoe but no trained video-text model "
                                 "is given: enable pretrain.video (the embed stage then reads "
                                 "its folder) or set encoder.camoe_path")
            self.video, meta = load_video_text(cfg.camoe_path)
            if meta["image_tower"] != cfg.image_tower or meta["frame_dim"] != self.image.dim:
                raise CAMoEError(f"the video-text model at {cfg.camoe_path} read frames of the "
                                 f"{meta['image_tower']} image tower; this encoder's is "
                                 f"{cfg.image_tower}: retrain it (qarm pretrain --force)")
        elif cfg.video_tower not in ("frames", "camoe"):
            raise ValueError(f"encoder.video_tower must be frames or camoe, got "
                             f"{cfg.video_tower!r}")

    def dims(self) -> dict[str, int]:
        d = {"text": self.text.dim}
        if self.image is not None:
            d["image"] = self.image.dim
            if self.cfg.video:
                d["video"] = self.video.out_dim if self.video is not None else 2 * self.image.dim
        return d


@dataclass
class TowerFeatures:
    """Per-modality features (B, d_m) and presence masks (B,) for one batch of items."""

    features: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]


def pack_features(f: TowerFeatures, dims: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """TowerFeatures → (B, sum of dims) float32 concatenated in ``dims`` order, (B, M) bool."""
    feats = np.concatenate([f.features[m].numpy() for m in dims], axis=1).astype(np.float32)
    present = np.stack([f.masks[m].numpy() for m in dims], axis=1)
    return feats, present


def unpack_features(feats: np.ndarray, present: np.ndarray, dims: dict[str, int]) -> TowerFeatures:
    """Inverse of :func:`pack_features`."""
    out, masks, start = {}, {}, 0
    for j, (m, d) in enumerate(dims.items()):
        out[m] = torch.from_numpy(np.ascontiguousarray(feats[:, start:start + d]))
        masks[m] = torch.from_numpy(np.ascontiguousarray(present[:, j]))
        start += d
    return TowerFeatures(out, masks)


class FusionHead(nn.Module):
    """Masked mean of per-modality projections, a residual MLP, L2 normalisation."""

    def __init__(self, dims: dict[str, int], out_dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dims = dict(dims)
        self.norm = nn.ModuleDict({m: nn.LayerNorm(d, elementwise_affine=False)
                                   for m, d in dims.items()})
        self.proj = nn.ModuleDict({m: nn.Linear(d, out_dim, bias=False) for m, d in dims.items()})
        for m, d in dims.items():
            with torch.no_grad():
                self.proj[m].weight.copy_(torch.randn(out_dim, d, generator=g) / d ** 0.5)
        self.modality = nn.ParameterDict({m: nn.Parameter(torch.zeros(out_dim)) for m in dims})
        self.mlp = nn.Sequential(nn.Linear(out_dim, out_dim), nn.GELU(),
                                 nn.Linear(out_dim, out_dim))
        with torch.no_grad():  # seeded, so equal configs give equal artifacts (and versions)
            self.mlp[0].weight.copy_(torch.randn(out_dim, out_dim, generator=g) / out_dim ** 0.5)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, f: TowerFeatures) -> torch.Tensor:
        """→ (B, D), unit norm."""
        total, count = 0.0, 0.0
        for m in self.dims:
            mask = f.masks[m].to(torch.float32).unsqueeze(-1)          # (B, 1)
            h = self.proj[m](self.norm[m](f.features[m])) + self.modality[m]
            total = total + mask * h
            count = count + mask
        z = total / torch.clamp(count, min=1.0)
        return nn.functional.normalize(z + self.mlp(z), dim=-1)


class MediaError(ValueError):
    """An item's image or video cannot be decoded."""


class ItemEncoder:
    """Towers + fusion head. ``encode`` maps item rows to unit-norm (B, D) float32 embeddings."""

    def __init__(self, cfg: ItemEncoderConfig, fusion_state: Optional[dict] = None,
                 towers: Optional[Towers] = None, text_state: Optional[dict] = None):
        self.cfg = cfg
        self.towers = towers or Towers(cfg)
        self.fusion = FusionHead(self.towers.dims(), cfg.dim, cfg.seed)
        if fusion_state is not None:
            self.fusion.load_state_dict(fusion_state)
        self.fusion.eval()
        #: Fine-tuned text-tower parameters (alignment's optional last layers), by name.
        self.text_state = {k: v.detach().clone() for k, v in (text_state or {}).items()}
        if self.text_state:
            self.towers.text.model.load_state_dict(self.text_state, strict=False)

    # ------------------------------------------------------------------ features
    def decode_media(self, row: dict) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """Decode one item's image and video frames; raises :class:`MediaError`."""
        from mm_encoder.towers import decode_rgb

        if self.towers.image is None:
            return None, None
        size = getattr(self.towers.image, "image_size", self.cfg.image_size)
        try:
            img = decode_rgb(row["image"], size) if row.get("image") else None
            vid = None
            frames = row.get("video")
            if self.cfg.video and frames is not None and len(frames):
                vid = np.stack([decode_rgb(f, size) for f in frames])
        except (OSError, ValueError, SyntaxError) as e:
            raise MediaError(f"{type(e).__name__}: {str(e)[:200]}") from None
        return img, vid

    @torch.no_grad()
    def tower_features(self, rows: Sequence[dict],
                       media: Optional[Sequence[tuple]] = None) -> TowerFeatures:
        from mm_encoder.towers import to_tensor

        n = len(rows)
        texts = [item_text(r["title"], r.get("text"), r.get("tags")) for r in rows]
        feats = {"text": self.towers.text(texts).float()}
        masks = {"text": torch.ones(n, dtype=torch.bool)}
        image = self.towers.image
        if image is not None:
            media = media if media is not None else [self.decode_media(r) for r in rows]
            dim = image.dim
            img_feat = torch.zeros(n, dim)
            have = [i for i, (im, _) in enumerate(media) if im is not None]
            if have and hasattr(image, "forward_tensor"):
                img_feat[have] = image.forward_tensor(to_tensor([media[i][0] for i in have]))
            elif have:  # CLIP takes encoded bytes through its own processor
                img_feat[have] = image([rows[i]["image"] for i in have])
            feats["image"] = img_feat
            masks["image"] = torch.zeros(n, dtype=torch.bool)
            masks["image"][have] = True
            if self.cfg.video:
                video = self.towers.video
                vid_feat = torch.zeros(n, self.towers.dims()["video"])
                vids = [i for i, (_, v) in enumerate(media) if v is not None]
                if vids and hasattr(image, "forward_tensor"):
                    lengths = [len(media[i][1]) for i in vids]
                    frames = to_tensor([f for i in vids for f in media[i][1]])
                    per_frame = image.forward_tensor(frames).float().split(lengths)
                    if video is not None:          # the trained video-text model's video side
                        from mm_encoder.camoe import pad_frames

                        x, m = pad_frames(per_frame, video.n_frames)
                        vid_feat[vids] = video.item_vectors(x, m)
                    else:
                        vid_feat[vids] = torch.stack(
                            [torch.cat([f.mean(0), f[-1] - f[0]]) for f in per_frame])
                else:
                    vids = []
                feats["video"] = vid_feat
                masks["video"] = torch.zeros(n, dtype=torch.bool)
                masks["video"][vids] = True
        return TowerFeatures(feats, masks)

    @torch.no_grad()
    def encode(self, rows: Sequence[dict], media: Optional[Sequence[tuple]] = None) -> np.ndarray:
        """Item rows (dicts with title, text, tags, image, video) → (B, D) float32, unit norm."""
        return self.encode_with_features(rows, media)[0]

    @torch.no_grad()
    def encode_with_features(self, rows: Sequence[dict], media: Optional[Sequence[tuple]] = None
                             ) -> tuple[np.ndarray, Optional[TowerFeatures]]:
        """Embeddings and the tower features they came from (kept for alignment training)."""
        if not rows:
            return np.zeros((0, self.cfg.dim), np.float32), None
        f = self.tower_features(rows, media)
        return self.fusion(f).numpy().astype(np.float32), f

    # ------------------------------------------------------------------ artifact
    @staticmethod
    @torch.no_grad()
    def embed_features_from(folder: str, feats: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Embed items from their stored tower features with the fusion head saved in
        ``folder`` (no tower is loaded): (n, D) float32, unit norm."""
        with open(os.path.join(folder, "encoder.pt"), "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        with open(os.path.join(folder, "config.json")) as f:
            dims = json.load(f)["dims"]
        fusion = FusionHead(dims, obj["config"]["dim"])
        fusion.load_state_dict(obj["fusion"])
        if len(feats) == 0:
            return np.zeros((0, obj["config"]["dim"]), np.float32)
        f = unpack_features(feats, present, dims)
        return fusion.eval()(f).numpy().astype(np.float32)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"config": dataclasses.asdict(self.cfg), "fusion": self.fusion.state_dict(),
                    "text_state": self.text_state}, buf)
        return buf.getvalue()

    @property
    def version(self) -> str:
        h = hashlib.sha256(json.dumps(dataclasses.asdict(self.cfg), sort_keys=True).encode())
        for k, v in [*sorted(self.fusion.state_dict().items()), *sorted(self.text_state.items())]:
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        return "enc-" + h.hexdigest()[:12]

    @classmethod
    def from_bytes(cls, data: bytes, towers: Optional[Towers] = None) -> "ItemEncoder":
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return cls(ItemEncoderConfig(**obj["config"]), obj["fusion"], towers,
                   obj.get("text_state"))

    def save(self, root: str) -> str:
        """Write the artifact to ``<root>/<version>/encoder.pt`` (once; versions never change)
        and return its folder."""
        folder = os.path.join(root, self.version)
        path = os.path.join(folder, "encoder.pt")
        if not os.path.exists(path):
            os.makedirs(folder, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(self.to_bytes())
            os.replace(tmp, path)
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump({"version": self.version, "config": dataclasses.asdict(self.cfg),
                           "dims": self.towers.dims()}, f, indent=2)
        return folder

    @classmethod
    def load(cls, folder: str, towers: Optional[Towers] = None) -> "ItemEncoder":
        with open(os.path.join(folder, "encoder.pt"), "rb") as f:
            return cls.from_bytes(f.read(), towers)
