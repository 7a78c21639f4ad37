"""Netflix's VMAF v0.6.1 model (../shared/data/vmaf_v0.6.1.json beside the checkout: a libsvm nu-SVR with an
RBF kernel over adm2, motion2 and vif_scale0..3) evaluated in numpy: the non-linear teacher of the
learning, gate and fleet benchmarks; and the synthetic encodes they score."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VMAF_MODEL = Path(__file__).resolve().parents[2] / "shared" / "data" / "vmaf_v0.6.1.json"
N_FEATURES = 6  # adm2, motion2, vif_scale0..3: the model's order


@dataclass(frozen=True)
class VmafTeacher:
    support: np.ndarray  # (n_sv, 6), in the model's normalised feature space
    coef: np.ndarray
    gamma: float
    rho: float
    slopes: np.ndarray  # the linear rescaling of [score, feature 1..6]
    intercepts: np.ndarray
    transform: tuple[float, float, float]  # the score's polynomial p0 + p1 s + p2 s²

    @classmethod
    def load(cls, path: Path = VMAF_MODEL) -> VmafTeacher:
        if not path.is_file():
            raise SystemExit(f"{path} is not there: this benchmark learns from Netflix's VMAF v0.6.1 model, "
                             "kept in shared/data/ beside the checkout (BENCHMARKS.md)")
        model = json.loads(path.read_text())["model_dict"]
        header, _, vectors = model["model"].partition("\nSV\n")
        fields = dict(line.split(" ", 1) for line in header.splitlines())
        rows = [line.split() for line in vectors.strip().splitlines()]
        support = np.zeros((len(rows), N_FEATURES))  # libsvm's sparse "index:value", 1-based; absent means 0
        for i, row in enumerate(rows):
            for pair in row[1:]:
                index, value = pair.split(":")
                support[i, int(index) - 1] = float(value)
        transform = model["score_transform"]
        return cls(support, np.array([float(row[0]) for row in rows]), float(fields["gamma"]), float(fields["rho"]),
                   np.array(model["slopes"]), np.array(model["intercepts"]),
                   (transform["p0"], transform["p1"], transform["p2"]))

    def normalised_score(self, scaled: np.ndarray) -> np.ndarray:
        """The score of feature vectors already in the model's normalised space, clipped to [0, 100]."""
        distance = (scaled ** 2).sum(1)[:, None] - 2 * scaled @ self.support.T + (self.support ** 2).sum(1)
        raw = np.exp(-self.gamma * distance) @ self.coef - self.rho
        return np.clip((raw - self.intercepts[0]) / self.slopes[0], 0, 100)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """VMAF's prediction for raw features: rescaled linearly, the nu-SVR, its score rescaled, the
        polynomial transform (never below the untransformed score) and the clip to [0, 100]."""
        scaled = x * self.slopes[1:] + self.intercepts[1:]
        distance = (scaled ** 2).sum(1)[:, None] - 2 * scaled @ self.support.T + (self.support ** 2).sum(1)
        score = (np.exp(-self.gamma * distance) @ self.coef - self.rho - self.intercepts[0]) / self.slopes[0]
        p0, p1, p2 = self.transform
        return np.clip(np.maximum(p0 + p1 * score + p2 * score ** 2, score), 0, 100)


def live_action(rng: np.random.Generator, q: np.ndarray) -> np.ndarray:
    """Feature vectors (adm2, motion2, vif scales 0-3) of live-action encodes of latent quality q: adm2 and
    VIF follow q, VIF falling faster at finer scales; motion2 is independent of it."""
    adm2 = 0.72 + 0.28 * q + rng.normal(0, 0.015, len(q))
    motion = np.minimum(rng.gamma(2.0, 2.5, len(q)), 20)
    return encodes(adm2, motion, [q ** (0.6 + 0.45 * k) + rng.normal(0, 0.03, len(q)) for k in range(4)])


def sports(rng: np.random.Generator, q: np.ndarray) -> np.ndarray:
    """Sports-like encodes: fast motion, and detail (the fine VIF scales) that survives encoding better."""
    adm2 = 0.55 + 0.45 * q + rng.normal(0, 0.015, len(q))
    motion = rng.uniform(8, 20, len(q))
    return encodes(adm2, motion, [q ** (1.6 - 0.4 * k) + rng.normal(0, 0.03, len(q)) for k in range(4)])


def encodes(adm2: np.ndarray, motion: np.ndarray, vif: list[np.ndarray]) -> np.ndarray:
    """The model's feature order, float32, the scores in [0, 1] clipped there."""
    x = np.stack([adm2, motion, *vif], axis=1)
    x[:, [0, 2, 3, 4, 5]] = np.clip(x[:, [0, 2, 3, 4, 5]], 0, 1)
    return x.astype(np.float32)
