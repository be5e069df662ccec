"""Training loaders with worker processes: orders, shared loaders across phases, counts, options."""

import math
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.combined_loader import _shutdown_workers_and_reset_iterator
from mllm_cl.data_modules import TaskSequence, continual

from mllm_cl.backbones import build_preset
from mllm_cl.data.images import ImageProcessor
from mllm_cl.data.loaders import KeptWorkers, resolve_workers
from mllm_cl.data.shards import write_shards

COLOURS = {"red": (210, 30, 30), "blue": (30, 40, 210), "green": (30, 180, 50), "grey": (120, 120, 120)}


@pytest.fixture(scope="module")
def backbone():
    return build_preset("tiny-clip-llama")


@pytest.fixture()
def bench(tmp_path, make_bench):
    """Two tasks (``colour``, ``mood``) of 37 training samples, four images."""
    (tmp_path / "bench").mkdir()
    return make_bench(tmp_path / "bench", COLOURS, train=37, test=2)


def _dm(bench, backbone=None, **kw) -> TaskSequence:
    dm = TaskSequence(benchmark=str(bench), template="short", batch_size=8, seed=3, **kw)
    if backbone is not None:
        dm.connect(backbone.tokenizer, ImageProcessor.for_model(backbone.model), backbone.model.num_image_tokens)
    return dm


def _ids(loader, batches=None) -> list[str]:
    out = []
    for k, batch in enumerate(loader):
        if k == batches:
            break
        out += batch["ids"]
    return out


def test_workers_give_every_sample_once_in_the_order_without_workers(bench, backbone):
    orders = {}
    for workers in (0, 2):
        dm = _dm(bench, backbone, num_workers=workers)
        dm.set_task(0)
        loader = dm.train_dataloader()
        assert loader.num_workers == workers and loader.persistent_workers == (workers > 0)
        orders[workers] = [_ids(loader), _ids(loader)]  # two epochs of one phase
    assert orders[0] == orders[2]
    first, second = orders[2]
    assert sorted(first) == sorted(second) == sorted(f"colour{i}" for i in range(37)) and first != second


def test_a_corrupt_image_read_by_a_worker_is_counted(bench, backbone):
    (bench / "images" / "blue.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    dm = _dm(bench, backbone, num_workers=2, on_bad_sample="skip")
    dm.set_task(0)
    seen = 0
    for batch in dm.train_dataloader():
        dm.note_batch(batch)
        seen += len(batch.get("ids", []))
    assert dm.skips["colour"].total == 9 and seen == 37 - 9  # samples 1, 5, ..., 33 show blue
    assert dm.skips["colour"].counts == {"corrupt image": 9} and "blue.png" in dm.skip_report(0)


def test_phases_on_the_same_data_share_the_loader_and_its_workers(bench, backbone):
    dm = _dm(bench, backbone, num_workers=2)
    dm.set_task(0)
    loader = dm.train_dataloader()
    assert isinstance(loader, KeptWorkers)
    _ids(loader, batches=2)  # a phase that ends within the epoch
    workers = loader._workers._workers
    _shutdown_workers_and_reset_iterator(loader)  # what Lightning does when a fit ends
    assert all(w.is_alive() for w in workers)
    dm.set_task(0)
    assert dm.train_dataloader() is loader and loader._workers._workers == workers
    fresh = _dm(bench, backbone, num_workers=0)
    fresh.set_task(0)
    assert _ids(loader) == _ids(fresh.train_dataloader())  # the next phase draws a fresh loader's order

    dm.set_task(0, fraction=0.5)
    half = dm.train_dataloader()
    assert half is not loader and loader._workers is None  # the old workers were stopped
    dm.set_task(0, fraction=0.5)
    assert dm.train_dataloader() is half
    for index, tasks in ((1, None), (1, [0, 1])):
        dm.set_task(index, tasks=tasks)
        other = dm.train_dataloader()
        assert other is not half and len(other.dataset) == 37 * (len(tasks) if tasks else 1)
        half = other
    fresh.set_task(1, tasks=[0, 1])
    assert _ids(half) == _ids(fresh.train_dataloader())
    assert fresh.train_dataloader() is not fresh.train_dataloader()  # without workers: a new loader each time


class _Consumer(L.LightningModule):
    """Records the ids of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen += batch["ids"]
        return (self.weight - 1) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_phase_trainers_keep_the_workers_and_each_phase_draws_a_fresh_loaders_batches(bench, backbone):
    dm = _dm(bench, backbone, num_workers=2)
    fresh = _dm(bench, backbone, num_workers=0)
    fresh.set_task(0)
    loader = fresh.train_dataloader()
    expected, second = _ids(loader), _ids(loader)
    workers = None
    for steps in (2, 7):  # the second phase goes into the loader's second epoch
        dm.set_task(0)
        module = _Consumer()
        trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, use_distributed_sampler=False)
        trainer.fit(module, datamodule=dm)
        assert module.seen[:37] == expected[: len(module.seen)]
        live = dm._kept[2]._workers._workers
        assert all(w.is_alive() for w in live) and (workers is None or live == workers)
        workers = live
    assert module.seen[37:] == second[:16]


def test_batches_per_epoch_counts_what_the_loader_draws(bench, backbone, monkeypatch):
    dm = _dm(bench, num_workers=0)
    dm.check_files()
    dm.set_task(0)
    assert dm.batches_per_epoch() == 5  # 37 samples in batches of 8, no model connected
    dm.connect(backbone.tokenizer, ImageProcessor.for_model(backbone.model), backbone.model.num_image_tokens)
    for index, fraction, tasks in ((0, 1.0, None), (0, 0.5, None), (1, 0.3, None), (1, 1.0, [0, 1]),
                                   (0, 0.5, [0, 1])):
        dm.set_task(index, fraction=fraction, tasks=tasks)
        loader = dm.train_dataloader()
        assert dm.batches_per_epoch() == len(loader) == sum(1 for _ in loader), (index, fraction, tasks)
    dm.set_task(1, tasks=[0, 1])
    assert dm.batches_per_epoch() == 10

    # Two processes: each draws its own share through a DistributedSampler seeded by the task.
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(continual, "world", lambda rank=rank: (rank, 2))
        dm.set_task(0)
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        assert loader.sampler.seed == dm.task_seed(0)
        assert dm.batches_per_epoch() == len(loader) == math.ceil(19 / 8) == 3
        shares.append(_ids(loader))
    assert len(shares[0]) == len(shares[1]) == 19  # 37 samples: one repeats to make the shares equal
    assert set(shares[0]) | set(shares[1]) == {f"colour{i}" for i in range(37)}


def test_batches_per_epoch_of_shards(bench, backbone, tmp_path):
    write_shards(bench / "colour_train.json", bench, tmp_path / "shards/colour", shard_size=10, progress=False)
    for workers, fraction, resample in ((0, 1.0, None), (2, 1.0, None), (2, 0.5, None), (2, 1.0, 3)):
        dm = _dm(bench, backbone, num_workers=workers, shards={"colour": str(tmp_path / "shards/colour")},
                 shuffle_buffer=4, resample_steps=resample)
        dm.set_task(0, fraction=fraction)
        drawn = sum(1 for _ in dm.train_dataloader())
        assert dm.batches_per_epoch() == drawn, (workers, fraction, resample)


def test_auto_workers_and_pinned_memory_follow_the_machine(bench, monkeypatch):
    dm = _dm(bench)
    assert dm.workers_option == "auto" and dm.pin_memory_option == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dm.num_workers == 0 and dm.pin_memory is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for cpus, local, expected in ((16, None, 8), (16, "2", 7), (16, "4", 3), (2, None, 1), (1, None, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        if local is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert dm.num_workers == expected, (cpus, local)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")  # Lightning's launcher: 4 processes, at most one per visible GPU
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert dm.num_workers == 7 and dm.pin_memory is True
    assert _dm(bench, num_workers=3, pin_memory=False).num_workers == 3
    assert _dm(bench, pin_memory=False).pin_memory is False


@pytest.mark.parametrize("key, value", [("num_workers", -1), ("num_workers", "many"), ("num_workers", True),
                                        ("num_workers", 1.5), ("pin_memory", "yes"), ("pin_memory", 1)])
def test_bad_loader_options_are_refused(bench, key, value):
    with pytest.raises(ValueError, match=f"data.{key} must be"):
        _dm(bench, **{key: value})
    with pytest.raises(ValueError, match="data.num_workers must be"):
        resolve_workers(-2)
