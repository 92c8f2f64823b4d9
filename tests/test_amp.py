"""Mixed precision (amp): bfloat16 autocast while training and fine-tuning, full precision
elsewhere; off by default, and then nothing changes (records keep their names)."""

import torch
import torch.nn as nn

from pgbd_defense.attacks.record import AttackSettings, record_name
from pgbd_defense.datasets import ImageSet
from pgbd_defense.datasets.batches import Normalizer
from pgbd_defense.defenses.loop import LoopConfig, Method, finetune
from pgbd_defense.metrics import predict


class Recording(Method):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.dtypes = []

    def step(self, model, x, y, store, opt, epoch):
        out = super().step(model, x, y, store, opt, epoch)
        self.dtypes.append(out["logits"].dtype)
        return out


def _run(amp: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    data = ImageSet(torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 2)
    method = Recording(LoopConfig(epochs=1, batch_size=8, augment=False, amp=amp))
    finetune(model, method, data, Normalizer([0.5], [0.5], 1))
    preds, _ = predict(model, data.images, Normalizer([0.5], [0.5], 1))
    return method.dtypes, model, preds


def test_amp_trains_in_bfloat16_and_keeps_weights_and_evaluation_in_float32():
    dtypes, model, preds = _run(amp=True)
    assert set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters()) and len(preds) == 16
    dtypes, _, _ = _run(amp=False)
    assert set(dtypes) == {torch.float32}


def test_records_without_amp_keep_their_names():
    # the ci gate's BadNets record, named before amp existed (results/table2_ci.md's runs)
    s = AttackSettings(attack="badnet", width=0.125, epochs=3, lr=0.02, augment=False, train_subset=20000)
    assert record_name(s) == "badnet_0_1_fashion-mnist_preactresnet18_64623386"
    amp = AttackSettings(attack="badnet", width=0.125, epochs=3, lr=0.02, augment=False, train_subset=20000, amp=True)
    assert record_name(amp) != record_name(s)
