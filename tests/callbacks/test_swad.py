"""SWAD: the official loss-valley rule on scripted losses, and the callback inside a Lightning fit."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.swad import SWAD, LossValley, Segment


def _segments(losses):
    """Segment k holds the single weight k."""
    return [Segment({"w": torch.tensor(float(k))}, {}, start_step=10 * k + 1, end_step=10 * k + 10, loss=loss)
            for k, loss in enumerate(losses)]


def _run(losses, **kw):
    valley = LossValley(**kw)
    for s in _segments(losses):
        valley.update(s)
    return valley


def test_valley_starts_at_the_oldest_minimum_and_ends_when_the_window_rises():
    # n_converge 3: segments 3, 4, 5 (losses 2, 2.5, 2.6) are the first triple whose oldest is the lowest, so the
    # valley starts at segment 3; threshold 1.3 × mean(2, 2.5, 2.6). Of the window [0..5] the head [0..3] is scanned:
    # segment 1 (loss 4) is the latest above the threshold, so segments from index 3 on are added: {3}. Later, each
    # window's oldest is added while the window's lowest loss stays under it: 3 (again), 4, 5, 6, 7; with segment 13
    # the window [8..13] holds only 10s: dead.
    losses = [5, 4, 3, 2, 2.5, 2.6, 2.4, 2.2, 10, 10, 10, 10, 10, 10]
    valley = _run(losses)
    assert valley.converge_step == 40 and valley.dead
    assert valley.threshold == pytest.approx(1.3 * (2 + 2.5 + 2.6) / 3)
    params, _, (start, end) = valley.final()
    assert params["w"].item() == pytest.approx((3 + 3 + 4 + 5 + 6 + 7) / 6)
    assert (start, end) == (31, 80)


def test_valley_still_open_at_the_end_takes_the_rest_of_the_window():
    # converged at segment 3 as above; training ends after segment 6 with the window [1..6]. final() drops the
    # oldest (1) and adds the rest while their lowest loss is under the threshold: 2, 3, 4, 5, 6 (the code's rule).
    valley = _run([5, 4, 3, 2, 2.5, 2.6, 2.4])
    assert not valley.dead
    params, _, _ = valley.final()
    assert params["w"].item() == pytest.approx((3 + 2 + 3 + 4 + 5 + 6) / 6)


def test_without_convergence_the_last_segment_is_returned():
    valley = _run([5, 4, 3, 2, 1])
    assert not valley.converged
    params, _, (start, end) = valley.final()
    assert params["w"].item() == 4.0 and (start, end) == (41, 50)


def test_seed_segment_is_replaced_by_the_first_added_one():
    # n_tolerance == n_converge: converged at segment 0 (threshold 1.3 × 2) with nothing added, so the average holds
    # segment 0 with a count of 0. Segment 3 makes the window [1, 2, 3] (lowest loss 2): segment 1 is added and, the
    # count being 0, replaces segment 0. Segment 4 (window lowest 3 > 2.6) kills the valley.
    valley = _run([1, 2, 3, 9, 9, 9], n_converge=3, n_tolerance=3)
    assert valley.converge_step == 10 and valley.dead
    assert valley.final()[0]["w"].item() == 1.0


class _Scripted(L.LightningModule):
    """w is set to the global step before every optimizer step; validation logs the next scripted loss."""

    def __init__(self, losses):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.register_buffer("tracked", torch.zeros(()))
        self.losses, self.calls = list(losses), 0
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        with torch.no_grad():
            self.w.fill_(float(self.global_step + 1))
            self.tracked.fill_(float(self.global_step + 1))
        opt.step()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.tensor(float(self.losses[self.calls])))

    def on_validation_epoch_end(self):
        self.calls += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_swad_callback_averages_segments_stops_on_dead_valley_and_saves(tmp_path):
    losses = [5, 4, 3, 2, 2.5, 2.6, 2.4, 2.2, 10, 10, 10, 10, 10, 10, 10, 10]
    swad = SWAD(module="w_holder", save_path=str(tmp_path / "swad.ckpt"))
    model = _Scripted(losses)
    model.w_holder = torch.nn.ParameterDict({"w": model.w})  # the averaged module
    data = DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=40, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[swad],
    )
    trainer.fit(model, train_dataloaders=data, val_dataloaders=data)
    # segment k covers steps 2k+1, 2k+2 (w = step): mean 2k + 1.5; dead after segment 13 (step 28)
    assert trainer.global_step == 28
    expected = sum(2 * k + 1.5 for k in (3, 3, 4, 5, 6, 7)) / 6
    assert model.w.item() == pytest.approx(expected)
    assert swad.result["dead_valley"] and swad.result["start_step"] == 7 and swad.result["end_step"] == 16
    saved = torch.load(tmp_path / "swad.ckpt", weights_only=False)["state_dict"]
    assert saved["w"].item() == pytest.approx(expected)


def test_swad_requires_the_monitored_metric(tmp_path):
    model = _Scripted([1.0] * 4)
    model.w_holder = torch.nn.ParameterDict({"w": model.w})
    data = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[SWAD(module="w_holder", monitor="val/other")],
    )
    with pytest.raises(KeyError, match="val/other"):
        trainer.fit(model, train_dataloaders=data, val_dataloaders=data)


def test_swad_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_converge"):
        SWAD(n_converge=0)
    with pytest.raises(ValueError, match="bn_update_batches"):
        SWAD(bn_update_batches=-1)
