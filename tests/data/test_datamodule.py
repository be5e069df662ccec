"""TaskSequence: the continual DataModule over hand-written files, batched for a real tiny model."""

import json

import pytest
import torch
from mllm_cl.data_modules import TaskSequence

from mllm_cl.backbones import build_preset
from mllm_cl.data.encoding import IGNORE
from mllm_cl.data.errors import BadSampleError
from mllm_cl.data.images import ImageProcessor
from mllm_cl.data.tasks import TaskSpec


@pytest.fixture(scope="module")
def backbone():
    return build_preset("tiny-clip-llama")


def _tasks(root):
    return [
        TaskSpec("colour", str(root / "colour_train.json"), str(root / "colour_test.json"), str(root)),
        TaskSpec("ground", str(root / "ground_train.json"), str(root / "ground_test.jsonl"), str(root),
                 scorer="grounding"),
    ]


def _dm(root, backbone, **kw):
    dm = TaskSequence(_tasks(root), template="short", batch_size=4, **kw)
    dm.connect(backbone.tokenizer, ImageProcessor.for_model(backbone.model), backbone.model.num_image_tokens)
    return dm


def test_training_batches_feed_the_model(llava_dir, backbone):
    dm = _dm(llava_dir, backbone)
    dm.set_task(0)
    (batch,) = list(dm.train_dataloader())
    model = backbone.model
    assert batch["input_ids"].shape[0] == 4 and batch["skipped"] == []
    assert batch["has_image"].tolist().count(True) == batch["pixel_values"].shape[0] == 3
    assert batch["pixel_values"].shape[1:] == (3, 32, 32)
    assert (batch["image_mask"].sum(1) == batch["has_image"].long() * 16).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    assert batch["attention_mask"][:, 0].all()  # right padding for training
    assert sorted(batch["instruction"]) == sorted(["What colour is it?\nAre you sure?", "What colour is it?",
                                                   "Say hi.", "What colour is it?"])
    assert batch["task_ids"].tolist() == [0, 0, 0, 0]
    loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                 labels=batch["labels"]).loss
    assert torch.isfinite(loss)


def test_eval_batches_are_left_padded_prompts_with_records(llava_dir, backbone):
    dm = _dm(llava_dir, backbone)
    loaders = dm.test_dataloaders()
    assert list(loaders) == ["colour", "ground"]
    (batch,) = list(loaders["colour"])
    assert batch["attention_mask"][:, -1].all()  # every prompt ends at the last position
    assert [r["question_id"] for r in batch["records"]] == ["q1", "q2", "q3"]
    for row in batch["input_ids"]:
        assert backbone.tokenizer.decode(row[-10:]) == "ASSISTANT:"  # one byte token per character
    (g,) = list(loaders["ground"])
    assert g["records"][0]["answer_bbox"] == "[0.1, 0.2, 0.5, 0.6]" and g["task_ids"].tolist() == [1]


def test_order_limits_fraction_and_task_seeds(llava_dir, backbone):
    dm = _dm(llava_dir, backbone, order=["ground", "colour"], train_limit=3, test_limit=2)
    assert dm.task_names == ["ground", "colour"]
    dm.set_task(1)
    assert len(dm.train_dataset(1)) == 3 and len(dm.test_dataset(1)) == 2
    dm.set_task(1, fraction=0.5)
    first = [b["ids"] for b in dm.train_dataloader()]
    again = [b["ids"] for b in dm.train_dataloader()]
    assert first == again and sum(len(i) for i in first) == 2  # seeded: the same subset and order
    assert dm.task_seed(0) != dm.task_seed(1)
    assert TaskSequence(_tasks(llava_dir), seed=0).task_seed(1) == dm.task_seed(1)
    assert TaskSequence(_tasks(llava_dir), seed=1).task_seed(1) != dm.task_seed(1)
    with pytest.raises(ValueError, match=r"order \['colour', 'nope'\] must name distinct tasks"):
        TaskSequence(_tasks(llava_dir), order=["colour", "nope"])
    with pytest.raises(ValueError, match="fraction must be in"):
        dm.set_task(0, fraction=0)
    with pytest.raises(RuntimeError, match="connect"):
        TaskSequence(_tasks(llava_dir)).train_dataset(0)


def test_corrupt_image_raises_or_is_skipped_counted_and_reported(llava_dir, backbone):
    (llava_dir / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    dm = _dm(llava_dir, backbone)
    dm.set_task(0)
    with pytest.raises(BadSampleError, match=r"colour_train.json, record 1: corrupt image: .*b.png"):
        list(dm.train_dataloader())
    dm = _dm(llava_dir, backbone, on_bad_sample="skip")
    dm.set_task(0)
    batches = list(dm.train_dataloader())
    for b in batches:
        dm.note_batch(b)
    assert sum(len(b["ids"]) for b in batches) == 3
    report = dm.skip_report()
    assert "task colour: skipped 1 bad samples" in report and "1 x corrupt image" in report
    assert "record 1" in report


def test_truncated_png_is_corrupt_too(llava_dir, backbone):
    data = (llava_dir / "images" / "a.png").read_bytes()
    (llava_dir / "images" / "a.png").write_bytes(data[: len(data) // 2])
    dm = _dm(llava_dir, backbone)
    with pytest.raises(BadSampleError, match="corrupt image"):
        dm.test_dataset(0)[0]


def test_exactly_one_source_of_tasks(llava_dir):
    with pytest.raises(ValueError, match="exactly one of `tasks` and `benchmark`"):
        TaskSequence()
    with pytest.raises(FileNotFoundError, match="data.benchmark: .*nothing does not exist"):
        TaskSequence(benchmark=str(llava_dir / "nothing"))


def test_check_files_reads_every_task_at_once_and_stops_at_the_last_tasks_bad_record(llava_dir):
    dm = TaskSequence(_tasks(llava_dir), template="short")
    assert dm.check_files() == {"tasks": 2, "train": 6, "test": 4, "skipped": 0}  # no model connected yet
    (llava_dir / "ground_test.jsonl").write_text('{"question_id": "g1", "text": "Where?", "answer": "x"}\n{"oops"\n')
    with pytest.raises(BadSampleError, match=r"ground_test.jsonl: malformed JSON on line 2"):
        TaskSequence(_tasks(llava_dir), template="short").check_files()
    (llava_dir / "ground_test.jsonl").write_text('{"question_id": "g1", "image": "images/gone.png", "text": "Where?", '
                                                 '"answer": "x"}\n')
    with pytest.raises(BadSampleError, match=r"ground_test.jsonl, record 0: missing image: .*gone.png"):
        TaskSequence(_tasks(llava_dir), template="short").check_files()
    dm = TaskSequence(_tasks(llava_dir), template="short", on_bad_sample="skip")
    with pytest.raises(BadSampleError,
                       match=r"ground_test.jsonl: task ground: no usable test rows \(1 skipped as bad\)"):
        dm.check_files()


def test_test_rows_skipped_are_counted_apart_from_training_and_per_evaluation(llava_dir, backbone):
    rows = json.loads((llava_dir / "colour_test.json").read_text())
    rows.append({"question_id": "q4", "image": "images/gone.png", "text": "What colour is it?", "answer": "red"})
    (llava_dir / "colour_test.json").write_text(json.dumps(rows))
    (llava_dir / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)  # q2 (and training s2)
    dm = _dm(llava_dir, backbone, on_bad_sample="skip")
    dm.check_files()
    assert dm.skips["colour"].total == 0 and dm.test_skips["colour"].counts == {"missing image": 1}
    for _ in range(2):  # every evaluation: the row dropped on reading plus the one its batch dropped
        skipped = [m for b in dm.test_dataloader(0) for m in b["skipped"]]
        log = dm.eval_skips(0, skipped)
        assert log.counts == {"missing image": 1, "corrupt image": 1} and log.total == 2
        assert "colour_test.json, record 1: corrupt image" in log.summary("colour")
    assert dm.test_skips["colour"].total == 1  # per-evaluation counts are not added up in the task's log
