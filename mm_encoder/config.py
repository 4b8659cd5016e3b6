"""Content-model configuration (plain dataclasses; importing this module does not import torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class ItemEncoderConfig:
    #: Item embedding size D.
    dim: int = 64
    #: ``minilm`` (packaged all-MiniLM-L6-v2), ``clip``, or a local transformers model directory.
    text_tower: str = "minilm"
    #: ``mobilenet_v2`` (packaged ImageNet weights), ``cat``, ``clip``, or ``none``.
    image_tower: Literal["mobilenet_v2", "cat", "clip", "none"] = "mobilenet_v2"
    #: Encode video frames with the image tower (ignored when there is no image tower).
    video: bool = True
    #: Side length images and frames are resized to before the image tower.
    image_size: int = 96
    clip_path: Optional[str] = None
    cat_checkpoint: Optional[str] = None
    #: CAT variant of the ``cat`` image tower (see ``mm_encoder/cat.py``).
    cat_variant: Literal["micro", "tiny", "small", "base"] = "micro"
    text_max_length: int = 64
    #: Items per forward pass.
    batch_size: int = 64
    seed: int = 0


@dataclass
class AlignConfig:
    #: ``infonce`` or ``dsl`` (the Dual Softmax Loss).
    loss: Literal["infonce", "dsl"] = "infonce"
    temperature: float = 0.07
    #: DSL prior temperature on the (already 1/temperature-scaled) logits.
    dsl_temperature: float = 1000.0
    #: Weight of the term keeping aligned embeddings near the raw ones.
    content_weight: float = 0.1
    epochs: int = 8
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    #: Also fine-tune the last N transformer layers of the text tower (0: towers frozen). The
    #: image/video towers stay frozen; their stored features are used.
    tune_text_layers: int = 0
    #: Learning rate of the tuned text layers.
    text_lr: float = 2e-5
    #: Pair sources to train on (of those the pairs stage mined).
    sources: list[Literal["swing", "itemcf", "u2i"]] = field(
        default_factory=lambda: ["swing", "itemcf", "u2i"])
    seed: int = 0
