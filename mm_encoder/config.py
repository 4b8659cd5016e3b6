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
    #: ``mobilenet_v2`` (packaged ImageNet weights), ``cat``, ``clip``, ``tagger`` (the
    #: backbone the ``pretrain`` stage trained on the items' tags), or ``none``.
    image_tower: Literal["mobilenet_v2", "cat", "clip", "tagger", "none"] = "mobilenet_v2"
    #: Encode video frames with the image tower (ignored when there is no image tower).
    video: bool = True
    #: The video tower over those frames: ``frames`` (the mean frame feature and the
    #: last-minus-first difference) or ``camoe`` (the video side of the video-text model the
    #: ``pretrain`` stage trained, ``pretrain.video``; the embed stage sets ``camoe_path``).
    video_tower: Literal["frames", "camoe"] = "frames"
    #: Encode only the highlight of each item's video (the moment its title describes, found
    #: by the ``ground`` stage, ``ground.enabled``) instead of the whole video.
    video_highlight: bool = False
    camoe_path: Optional[str] = None
    #: Side length images and frames are resized to before the image tower.
    image_size: int = 96
    clip_path: Optional[str] = None
    cat_checkpoint: Optional[str] = None
    #: The saved tagger folder of the ``tagger`` image tower (set by the embed stage from the
    #: ``pretrain`` stage's output; a path to use another).
    tagger_path: Optional[str] = None
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


@dataclass
class VideoTextConfig:
    """The video-text model the ``pretrain`` stage trains on the items' (video, caption) pairs
    (``mm_encoder/camoe.py``); its video side can be the item encoder's video tower."""
    #: Train it (items without a video are left out; with none, nothing is trained).
    enabled: bool = False
    #: ``camoe`` (action/entity/scene streams, text gate) or ``mean_pool`` (the reference).
    model: Literal["camoe", "mean_pool"] = "camoe"
    #: ``dsl`` (the Dual Softmax Loss) or ``infonce``.
    loss: Literal["dsl", "infonce"] = "dsl"
    #: Width of each stream's vector (the item's video vector is 3 x dim) and of the streams'
    #: internal frame features.
    dim: int = 64
    width: int = 128
    temporal_layers: int = 1
    #: Frames read per video (longer videos: evenly spaced), tokens per caption.
    max_frames: int = 8
    max_tokens: int = 32
    #: Similarity temperature (logits = cosine / temperature) and DSL's prior temperature on
    #: those logits (large: close to InfoNCE; the paper uses 1000 on ~100x logits).
    temperature: float = 0.05
    dsl_temperature: float = 1000.0
    epochs: int = 40
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    #: Share of the items held out (a hash of the item id) for R@K / MdR / MnR.
    holdout: float = 0.2
    seed: int = 0


@dataclass
class GroundingConfig:
    """The GMU video-grounding model (``mm_encoder/gmu.py``) and the ``ground`` stage."""
    #: Run the ground stage (items with a video and a title get their highlight).
    enabled: bool = False
    #: The parts of GMU: moment level (start/end per step), clip level (proposals over window
    #: lengths), and the generator whose implicit boundary and clip features query the
    #: cross-attention discriminator. Each can be switched off (not both levels).
    moment: bool = True
    clip: bool = True
    generator: bool = True
    #: Width of the model, temporal transformer layers over the frames, attention heads.
    dim: int = 64
    layers: int = 2
    heads: int = 4
    #: Steps per video (longer videos: evenly spaced frames), tokens per query.
    max_frames: int = 24
    max_tokens: int = 16
    #: Clip-level proposal lengths, as shares of the video (every start, stride 1 step).
    windows: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.375, 0.5, 0.75])
    #: Weight of the clip score against the boundary log-probabilities at inference.
    clip_weight: float = 1.0
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    #: Share of the grounding videos held out for R@K / mIoU.
    holdout: float = 0.2
    seed: int = 0
    #: Training data: ``synthetic`` (untrimmed videos with several events, rendered from the
    #: world's visual vocabulary) or ``charades`` (an annotation file ``video_id start
    #: end##sentence`` over precomputed frame features, ``charades_*`` below).
    data: Literal["synthetic", "charades"] = "synthetic"
    synthetic_videos: int = 800
    synthetic_frames: int = 24
    synthetic_size: int = 24
    charades_annotations: Optional[str] = None
    #: Folder of ``<video_id>.npy`` arrays (steps, d) and a CSV ``id,length`` of durations (s).
    charades_features: Optional[str] = None
    charades_durations: Optional[str] = None


@dataclass
class PretrainConfig:
    """The ``pretrain`` stage: a multi-label tagger trained on the items' tags
    (``mm_encoder/tagger.py``); its backbone can be the item encoder's image tower."""
    enabled: bool = True
    #: ``mltr`` (MlTr micro) or ``cat`` (CAT micro).
    backbone: Literal["mltr", "cat"] = "mltr"
    image_size: int = 32
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    #: Asymmetric loss (ASL): focusing of negatives and positives, probability margin.
    gamma_neg: float = 4.0
    gamma_pos: float = 0.0
    margin: float = 0.05
    #: Share of the items held out (chosen by a hash of the item id) for the metrics.
    holdout: float = 0.2
    #: Tags with fewer training items are left out of the vocabulary.
    min_count: int = 2
    #: Predicted tags of an item: those with probability >= threshold, at most ``top``.
    threshold: float = 0.5
    top: int = 5
    seed: int = 0
    #: The video-text model (CAMoE) trained in the same stage.
    video: VideoTextConfig = field(default_factory=VideoTextConfig)
