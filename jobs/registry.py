"""The model registry (MLflow): registered models, their lineage, and the promotion gate.

Registered models, each version a folder of weights plus config (nothing is pickled):

* ``qarm-item-encoder`` (``align``): ``encoder.pt`` (tensors, read with ``weights_only``) and
  ``config.json``; tags ``encoder_version``, ``raw_encoder_version``, ``pairs_snapshot``.
* ``qarm-codebook`` (``quantize``, ``quantize_raw``): ``codebook.npz`` (arrays, read without
  pickle) and ``codebook.json``; tags ``codebook_version``, ``encoder_version``,
  ``encoder_model_version``, ``embeddings_snapshot``, ``kind`` (aligned or raw).
* ``qarm-ranker`` (``train``, one version per arm): ``weights.safetensors`` and ``ranker.json``
  (``recsys.saved``); tags ``arm``, ``codebook_version``, ``codebook_model_version``,
  ``encoder_version``, ``encoder_model_version``, ``examples`` (snapshot), ``world_size``.
* ``qarm-retriever`` (``retrieve``, one version per tower): ``weights.safetensors``,
  ``retriever.json`` and ``features.npz`` (``recsys.saved``); tags ``item_repr``, the codebook
  and encoder versions it reads, ``events`` (the split snapshot), ``world_size``.

The train stage points the alias ``challenger`` at the production arm's new version
(``registry.arm``). :func:`promote` moves ``champion`` to it only when the challenger's lineage is
consistent (the codebook and encoder registered with it are the ones it was trained on, checked
against the downloaded files) and the paired-bootstrap lower bound of its AUC difference on the
same evaluation examples, each model with its own encoder and codes, is above 0: against the
champion, or against the popularity baseline when there is no champion yet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

ENCODER, CODEBOOK, RANKER = "qarm-item-encoder", "qarm-codebook", "qarm-ranker"
RETRIEVER = "qarm-retriever"
CHAMPION, CHALLENGER = "champion", "challenger"
#: Which tag of a version names its parent model's registered version, per model.
PARENTS = {RANKER: ((CODEBOOK, "codebook_model_version"), (ENCODER, "encoder_model_version")),
           RETRIEVER: ((CODEBOOK, "codebook_model_version"), (ENCODER, "encoder_model_version")),
           CODEBOOK: ((ENCODER, "encoder_model_version"),), ENCODER: ()}
#: Tags shown by `qarm lineage` (the versions and snapshots a model was built from).
LINEAGE_TAGS = ("arm", "item_repr", "kind", "encoder_version", "raw_encoder_version", "codebook_version",
                "pairs_snapshot", "embeddings_snapshot", "examples", "world_size")


class RegistryError(LookupError):
    """A registered model, version or alias does not exist (or tracking is off)."""


class Registry:
    def __init__(self, cfg):
        if not cfg.mlflow.enabled:
            raise RegistryError("the model registry needs MLflow (mlflow.enabled: true)")
        import mlflow

        from jobs.tracking import tracking_uri

        self.mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri(cfg))

    def version(self, name: str, version: str):
        try:
            return self.client.get_model_version(name, str(version))
        except self.mlflow.exceptions.MlflowException:
            raise RegistryError(f"no version {version} of registered model {name}") from None

    def find(self, name: str, **tags) -> Optional[object]:
        """The newest version of ``name`` whose tags include ``tags``."""
        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except self.mlflow.exceptions.MlflowException:
            return None
        hits = [v for v in versions if all(v.tags.get(k) == str(x) for k, x in tags.items())]
        return max(hits, key=lambda v: int(v.version), default=None)

    def parent_tags(self, parents: tuple[str, ...], codebook_version: str,
                    encoder_version: str) -> dict:
        """Lineage tags of a model that reads ``parents`` (CODEBOOK and/or ENCODER): each
        parent's content version and, when registered, its registered version."""
        tags = {}
        for model, tag, key, value in ((CODEBOOK, "codebook_model_version", "codebook_version",
                                        codebook_version),
                                       (ENCODER, "encoder_model_version", "encoder_version",
                                        encoder_version)):
            if model in parents:
                tags[key] = value
                found = self.find(model, **{key: value})
                if found is not None:
                    tags[tag] = found.version
        return tags

    def alias(self, name: str, alias: str) -> Optional[object]:
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except self.mlflow.exceptions.MlflowException:
            return None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))

    def download(self, v) -> Path:
        return Path(self.mlflow.artifacts.download_artifacts(artifact_uri=v.source))

    def lineage(self, name: str, version: str) -> list[dict]:
        """The chain from a version to everything it was built from, depth first."""
        v = self.version(name, version)
        out = [{"model": name, "version": str(v.version), "run_id": v.run_id,
                "aliases": list(getattr(v, "aliases", []) or []),
                "tags": {k: v.tags[k] for k in LINEAGE_TAGS if k in v.tags}}]
        for parent, tag in PARENTS[name]:
            if tag in v.tags:
                out += [{**p, "depth": p.get("depth", 0) + 1}
                        for p in self.lineage(parent, v.tags[tag])]
        return out

    def check_lineage(self, v, needs: tuple[str, ...] = (CODEBOOK, ENCODER),
                      name: str = RANKER) -> list[str]:
        """Why a version's registered codebook and encoder (those of ``needs``) are not the
        ones it was trained with (empty: consistent). Compares tags and the downloaded files'
        versions."""
        from mm_encoder.item_encoder import ItemEncoder
        from quantizer.codebook import Codebook

        problems = []
        for parent, tag, want_tag, actual in (
                (CODEBOOK, "codebook_model_version", "codebook_version",
                 lambda d: Codebook.from_bytes((d / "codebook.npz").read_bytes()).version),
                (ENCODER, "encoder_model_version", "encoder_version",
                 lambda d: ItemEncoder.load(str(d)).version)):
            if parent not in needs:
                continue
            if tag not in v.tags:
                problems.append(f"{name} v{v.version} names no {parent} version ({tag})")
                continue
            try:
                p = self.version(parent, v.tags[tag])
            except RegistryError as e:
                problems.append(str(e))
                continue
            want = v.tags.get(want_tag)
            if p.tags.get(want_tag) != want:
                problems.append(f"{name} v{v.version} was trained with {want_tag} {want}, but "
                                f"{parent} v{p.version} is {p.tags.get(want_tag)}")
            elif actual(self.download(p)) != want:
                problems.append(f"{parent} v{p.version}'s files are not {want_tag} {want}")
        return problems


def format_lineage(chain: list[dict]) -> str:
    lines = []
    for c in chain:
        alias = f" @{','.join(c['aliases'])}" if c["aliases"] else ""
        tags = ", ".join(f"{k}={x}" for k, x in c["tags"].items())
        lines.append(f"{'  ' * c.get('depth', 0)}{c['model']} v{c['version']}{alias}: {tags}")
    return "\n".join(lines)


@dataclass
class Decision:
    promoted: bool
    reason: str
    challenger: Optional[str] = None
    champion: Optional[str] = None
    against: str = ""
    stats: dict = field(default_factory=dict)
    model: str = RANKER
    metric: str = "AUC"

    def text(self) -> str:
        s = self.stats
        head = (f"{self.model} v{self.challenger} vs {self.against}: {self.metric} difference "
                f"{s['diff']:+.4f} [{s['lo']:+.4f}, {s['hi']:+.4f}] ({s['level']:.0%}, "
                f"{s['users']} users, {s['examples']} examples)\n") if s else ""
        verdict = "PROMOTED to champion" if self.promoted else "NOT promoted"
        return f"{head}{verdict}: {self.reason}"
