"""Shared values of the unit tests of the split-cache stages (the fixtures are in conftest.py)."""

import numpy as np
import siphash24

from agile_pipeline.lib.training import TrainConfig, train_classifier

KEY = b"test-evalset-key"  # 16 bytes, for the hand-checked SipHash and eval-set tests
SPLIT_MODEL = "unit-32"
SPLIT_DIM = 32


def reference_siphash(item: str) -> int:
    """SipHash-2-4 straight from the package: the 8-byte digest read little-endian."""
    return int.from_bytes(siphash24.siphash24(item.encode(), key=KEY).digest(), "little")



def trained_on_split(vs, round_index=1, seed=0):
    """A classifier trained on every other of the first 400 train rows, and their ids."""
    train = vs.matrix(SPLIT_MODEL, "train")
    lab = np.arange(0, 400, 2)
    y = (np.asarray(train.vectors[lab], np.float32)[:, 0] > 0.3).astype(int)
    y[:3] = 1
    return train_classifier(np.asarray(train.vectors[lab], np.float32), y, train.vectors,
                            round_index=round_index, exclude_from_pool=lab,
                            config=TrainConfig(seed=seed)), [str(train.ids[i]) for i in lab]
