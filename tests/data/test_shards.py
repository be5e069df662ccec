"""WebDataset shards: round trip, the same samples as the JSON files, exactly-once splitting, bad shards."""

import json
import tarfile
from collections import Counter

import pytest
import torch
import webdataset as wds
from mllm_cl.data_modules import TaskSequence
from PIL import Image
from torch.utils.data import DataLoader

from mllm_cl.backbones import build_preset
from mllm_cl.data import synth
from mllm_cl.data.collate import Skipped
from mllm_cl.data.errors import BadSampleError, SkipLog
from mllm_cl.data.formats import load_conversations
from mllm_cl.data.images import ImageProcessor
from mllm_cl.data.shards import MANIFEST, EpochDataLoader, ShardDataset, shard_list, write_shards


@pytest.fixture(scope="module")
def backbone():
    return build_preset("tiny-clip-llama")


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    """23 synthetic conversations with PNG images, as JSON + images."""
    root = tmp_path_factory.mktemp("synth")
    synth.generate(root, tasks=["color"], train_size=23, test_size=2, image_size=32, seed=0, progress=False)
    return root / "color"


def _shard(src, out, size):
    return write_shards(src / "train.json", src, out, shard_size=size, progress=False)


def test_round_trip_keeps_records_and_image_bytes(llava_dir, tmp_path):
    Image.new("RGB", (30, 20), (9, 99, 199)).save(llava_dir / "images" / "d.jpg", quality=85)
    Image.new("RGB", (20, 20), (50, 60, 70)).save(llava_dir / "images" / "e.gif")
    records = json.loads((llava_dir / "colour_train.json").read_text())
    records += [{"id": "s5", "image": "images/d.jpg", "conversations": records[3]["conversations"]},
                {"id": "s6", "image": "images/e.gif", "conversations": records[3]["conversations"]}]
    (llava_dir / "colour_train.json").write_text(json.dumps(records))
    manifest = write_shards(llava_dir / "colour_train.json", llava_dir, tmp_path / "out", shard_size=4, progress=False)
    assert manifest["samples"] == 6 and manifest["kind"] == "conversation"
    assert [(s["file"], s["samples"]) for s in manifest["shards"]] == [("colour_train-000000.tar", 4),
                                                                      ("colour_train-000001.tar", 2)]
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == manifest
    with tarfile.open(tmp_path / "out/colour_train-000000.tar") as tar:
        names = tar.getnames()
    assert names == ["00000000.json", "00000000.png", "00000001.json", "00000001.png", "00000002.json",
                     "00000003.json", "00000003.png"]
    with tarfile.open(tmp_path / "out/colour_train-000001.tar") as tar:
        assert tar.getnames() == ["00000004.jpg", "00000004.json", "00000005.json", "00000005.png"]
        body = json.loads(tar.extractfile("00000004.json").read())
        assert "image" not in body and body["source_image"] == "images/d.jpg"
        assert tar.extractfile("00000004.jpg").read() == (llava_dir / "images/d.jpg").read_bytes()  # bytes as they are

    streamed = list(ShardDataset(str(tmp_path / "out")))
    loaded = load_conversations(llava_dir / "colour_train.json", llava_dir)
    assert [s["id"] for s in streamed] == [c.id for c in loaded]
    assert [s["index"] for s in streamed] == list(range(6))
    images = ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    for s, c in zip(streamed, loaded, strict=False):
        conv = s["conversation"]
        assert conv.turns == c.turns and (conv.image is None) == (c.image is None)
        if c.image is not None:
            assert torch.equal(images.load(conv.image), images.load(c.image))
    # Ordinary WebDataset shards: the library reads them too.
    plain = list(wds.WebDataset(str(tmp_path / "out/colour_train-{000000..000001}.tar"), shardshuffle=False))
    assert [p["__key__"] for p in plain] == [f"{i:08d}" for i in range(6)]
    assert json.loads(plain[2]["json"])["id"] == "s3" and "png" not in plain[2]


def test_training_from_shards_gives_the_json_files_samples(colors, tmp_path, backbone):
    _shard(colors, tmp_path / "shards" / "color", 5)
    dms = []
    for shards, workers in ((None, 0), (str(tmp_path / "shards"), 2)):
        dm = TaskSequence(benchmark=str(colors.parent), template="short", batch_size=4, num_workers=workers,
                          shards=shards, shuffle_buffer=8)
        dm.connect(backbone.tokenizer, ImageProcessor.for_model(backbone.model), backbone.model.num_image_tokens)
        dms.append(dm)
    assert dms[1].tasks[0].train_shards == str(tmp_path / "shards" / "color")
    samples = []
    for dm in dms:
        loader = dm.train_dataloader()
        by_id = {}
        for batch in loader:
            for k, sample_id in enumerate(batch["ids"]):
                n = int(batch["attention_mask"][k].sum())
                by_id[sample_id] = (batch["input_ids"][k, :n].tolist(), batch["labels"][k, :n].tolist(),
                                    batch["pixel_values"][k])
        samples.append(by_id)
    assert isinstance(dms[1].train_dataloader(), EpochDataLoader)
    json_samples, shard_samples = samples
    assert len(json_samples) == 23 and sorted(json_samples) == sorted(shard_samples)
    for sample_id, (ids, labels, pixels) in json_samples.items():
        s_ids, s_labels, s_pixels = shard_samples[sample_id]
        assert ids == s_ids and labels == s_labels and torch.equal(pixels, s_pixels), sample_id


def _indices(source, *, epochs=1, world=2, workers=2, **kw):
    """Sample indices each (rank, epoch) sees, through real DataLoader workers."""
    seen = {}
    for rank in range(world):
        data = ShardDataset(source, rank=rank, world_size=world, **kw)
        loader = EpochDataLoader(data, batch_size=3, num_workers=workers, collate_fn=list)
        for epoch in range(epochs):
            seen[rank, epoch] = [s["index"] for batch in loader for s in batch]
    return seen


@pytest.mark.parametrize("shard_size,split", [(4, "shard"), (10, "sample")], ids=["6-shards", "3-shards"])
def test_every_sample_once_per_epoch_over_two_workers_and_two_processes(colors, tmp_path, shard_size, split):
    _shard(colors, tmp_path, shard_size)
    data = ShardDataset(str(tmp_path))
    assert data._split_mode(consumers=4) == split  # 6 shards are dealt out; 3 are split by sample
    seen = _indices(str(tmp_path), epochs=2, shuffle=True, shuffle_buffer=6, seed=3)
    for epoch in range(2):
        both = seen[0, epoch] + seen[1, epoch]
        assert sorted(both) == list(range(23)), (epoch, both)
    assert seen[0, 0] + seen[1, 0] != seen[0, 1] + seen[1, 1]  # a new order each epoch
    assert _indices(str(tmp_path), epochs=2, shuffle=True, shuffle_buffer=6, seed=3) == seen  # seeded


def test_equal_ranks_fraction_and_resampling(colors, tmp_path):
    _shard(colors, tmp_path, 4)
    # Dealing 6 uneven shards to 4 consumers would repeat a whole shard's worth: split by sample instead.
    assert ShardDataset(str(tmp_path), equal_ranks=True)._split_mode(consumers=4) == "sample"
    seen = _indices(str(tmp_path), equal_ranks=True)
    assert len(seen[0, 0]) == len(seen[1, 0]) == 12 and set(seen[0, 0] + seen[1, 0]) == set(range(23))
    seen = _indices(str(tmp_path), fraction=0.5, seed=1)
    both = seen[0, 0] + seen[1, 0]
    assert len(both) == len(set(both)) == 12  # a seeded half, still each once
    seen = _indices(str(tmp_path), limit=5)  # data.train_limit: the first 5, as from the JSON file
    assert sorted(seen[0, 0] + seen[1, 0]) == [0, 1, 2, 3, 4]
    data = ShardDataset(str(tmp_path), rank=0, world_size=2, resample_batches=5, batch_size=3, shuffle=True,
                        shuffle_buffer=4)
    batches = [b for b in EpochDataLoader(data, batch_size=3, num_workers=2, collate_fn=list)]
    assert len(batches) == 5 and all(len(b) == 3 for b in batches)  # 5 steps, whatever the data size
    assert {s["index"] for b in batches for s in b} <= set(range(23))


def _items(source, *, world=2, workers=2, **kw):
    """Every item each rank draws in one epoch through real DataLoader workers, ``Skipped`` included."""
    return {rank: [s for batch in EpochDataLoader(ShardDataset(source, rank=rank, world_size=world, **kw),
                                                  batch_size=3, num_workers=workers, collate_fn=list)
                   for s in batch]
            for rank in range(world)}


@pytest.mark.parametrize("shard_size,split", [(4, "shard"), (10, "sample")], ids=["6-shards", "3-shards"])
def test_epoch_batches_is_what_each_rank_draws(colors, tmp_path, shard_size, split):
    _shard(colors, tmp_path, shard_size)
    for kw in ({}, {"equal_ranks": True}, {"fraction": 0.5, "seed": 2}):
        for rank in range(2):
            data = ShardDataset(str(tmp_path), rank=rank, world_size=2, batch_size=3, shuffle=True, split=split, **kw)
            drawn = sum(1 for _ in EpochDataLoader(data, batch_size=3, num_workers=2, collate_fn=list))
            assert data.epoch_batches(workers=2) == drawn, (kw, rank)


def test_shards_without_a_manifest_give_every_sample_once(colors, tmp_path):
    _shard(colors, tmp_path, 10)
    glob = str(tmp_path / "*.tar")
    items = _items(glob, shuffle=True, shuffle_buffer=4)  # 3 shards, 4 consumers: split by sample
    indices = [s["index"] for rank in (0, 1) for s in items[rank]]
    assert sorted(indices) == list(range(23))  # the running index is the canonical one: every consumer reads all
    _shard(colors, tmp_path / "six", 4)
    items = _items(str(tmp_path / "six" / "*.tar"), split="shard")
    ids = [s["id"] for rank in (0, 1) for s in items[rank]]
    assert len(ids) == len(set(ids)) == 23


def test_the_same_shards_under_two_tasks_are_read_once_per_task(colors, tmp_path):
    _shard(colors, tmp_path, 10)
    items = _items([str(tmp_path), str(tmp_path)], task_ids=[3, 5], shuffle=True)
    seen = sorted((s["task_id"], s["index"]) for rank in (0, 1) for s in items[rank])
    assert seen == [(3, j) for j in range(23)] + [(5, j) for j in range(23, 46)]
    assert set(items[0][0]) == {"conversation", "id", "index", "task_id"}  # no reader fields leak into samples


def test_resampling_is_seeded_by_epoch_and_gives_each_rank_its_batches(colors, tmp_path):
    _shard(colors, tmp_path, 4)

    def draws(epochs):
        seen = {}
        for rank in range(2):
            data = ShardDataset(str(tmp_path), rank=rank, world_size=2, resample_batches=3, batch_size=4,
                                shuffle=True, shuffle_buffer=5, seed=7)
            loader = EpochDataLoader(data, batch_size=4, num_workers=2, collate_fn=list)
            for epoch in range(epochs):
                seen[rank, epoch] = [[s["index"] for s in b] for b in loader]
        return seen

    seen = draws(2)
    assert all(len(b) == 3 and all(len(x) == 4 for x in b) for b in seen.values())
    assert draws(2) == seen  # seeded
    assert seen[0, 0] != seen[0, 1] and seen[0, 0] != seen[1, 0]  # a new draw per epoch and per rank


def _truncate(path):
    """Cut the shard inside the image data of its third sample."""
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".png")][2]
    path.write_bytes(path.read_bytes()[: member.offset_data + 20])


def test_truncated_or_corrupt_shard_raises_or_is_skipped_and_counted(colors, tmp_path, backbone):
    _shard(colors, tmp_path / "color", 10)
    _truncate(tmp_path / "color/train-000001.tar")
    with pytest.raises(BadSampleError, match=r"train-000001.tar: corrupt shard: unexpected end of data"):
        # In a worker process, and still a BadSampleError here (one worker: with two, torch waits 5 s
        # for the other one when a worker raises).
        list(DataLoader(ShardDataset(str(tmp_path / "color")), num_workers=1, collate_fn=list))
    dm = TaskSequence(benchmark=str(colors.parent), template="short", batch_size=4, num_workers=2,
                      shards=str(tmp_path), on_bad_sample="skip")
    dm.connect(backbone.tokenizer, ImageProcessor.for_model(backbone.model), backbone.model.num_image_tokens)
    dm.set_task(0)
    ids = []
    for batch in dm.train_dataloader():
        dm.note_batch(batch)
        ids += batch.get("ids", [])
    assert len(ids) == len(set(ids)) == 15  # shard 1 loses its samples from the cut on: 10 + 2 + 3
    report = dm.skip_report()
    assert "task color: skipped 1 bad samples" in report and "1 x corrupt shard" in report
    # A shard that lost whole samples (cut between members) is caught by the manifest's count.
    _shard(colors, tmp_path / "again", 10)
    path = tmp_path / "again/train-000002.tar"
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[2].offset  # the start of the second sample's header
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(BadSampleError, match=r"train-000002.tar: truncated shard: its manifest lists 3 samples, "
                                             r"read 1"):
        list(ShardDataset(str(tmp_path / "again")))


def test_corrupt_image_in_a_shard_is_a_bad_sample(colors, tmp_path, backbone):
    _shard(colors, tmp_path, 30)
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name == "00000002.png")
    data = bytearray(path.read_bytes())
    data[member.offset_data + 40: member.offset_data + 60] = b"\0" * 20  # inside the PNG's pixel data
    path.write_bytes(bytes(data))
    encoder_args = dict(encoder=None, images=None)
    assert len(list(ShardDataset(str(tmp_path), **encoder_args))) == 23  # undecoded: nothing noticed yet
    dm = TaskSequence(benchmark=str(colors.parent), template="short", shards={"color": str(tmp_path)})
    dm.connect(backbone.tokenizer, ImageProcessor.for_model(backbone.model), backbone.model.num_image_tokens)
    with pytest.raises(BadSampleError, match=r"train-000000.tar, sample 00000002: corrupt image: .*00000002.png"):
        list(dm.train_dataloader())


def test_writing_checks_records_like_the_loaders(llava_dir, tmp_path):
    records = json.loads((llava_dir / "colour_train.json").read_text())
    records.insert(1, {"id": "x", "image": "images/missing.png",
                       "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    (llava_dir / "images/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    records.append({"id": "y", "image": "images/bad.png", "conversations": records[0]["conversations"]})
    (llava_dir / "mixed.json").write_text(json.dumps(records))
    with pytest.raises(BadSampleError, match=r"mixed.json, record 1: missing image: .*missing.png"):
        write_shards(llava_dir / "mixed.json", llava_dir, tmp_path, progress=False)
    skips = SkipLog()
    manifest = write_shards(llava_dir / "mixed.json", llava_dir, tmp_path, on_bad_sample="skip", skips=skips,
                            progress=False)
    assert manifest["samples"] == 4 and manifest["skipped"] == 2
    assert Counter(skips.counts) == Counter({"missing image": 1, "corrupt image": 1})
    assert [s["id"] for s in ShardDataset(str(tmp_path))] == ["s1", "s2", "s3", "s4"]


def test_shard_sources_and_config_errors(colors, tmp_path, llava_dir):
    with pytest.raises(FileNotFoundError, match="no shards there"):
        shard_list(tmp_path / "nothing")
    write_shards(llava_dir / "colour_test.json", llava_dir, tmp_path / "test", progress=False)
    with pytest.raises(ValueError, match="these shards hold test records; training needs conversations"):
        shard_list(tmp_path / "test")
    _shard(colors, tmp_path / "c", 10)
    assert [f.samples for f in shard_list(tmp_path / "c")] == [10, 10, 3]
    assert [f.samples for f in shard_list(str(tmp_path / "c" / "*.tar"))] == [None, None, None]
    with pytest.raises(FileNotFoundError, match=r"data.shards: shards missing or unreadable:\n  - task color: "):
        TaskSequence(benchmark=str(colors.parent), shards=str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="data.shards names tasks that are not in the sequence: \\['colour'\\]"):
        TaskSequence(benchmark=str(colors.parent), shards={"colour": str(tmp_path / "c")})
    with pytest.raises(ValueError, match="equal_ranks needs the sample counts"):
        ShardDataset(str(tmp_path / "c" / "*.tar"), equal_ranks=True)


@pytest.mark.parametrize("shard_size,split", [(4, "shard"), (10, "sample")], ids=["6-shards", "3-shards"])
def test_a_bad_shard_is_counted_once_over_two_workers_and_two_processes(colors, tmp_path, shard_size, split):
    _shard(colors, tmp_path, shard_size)
    _truncate(tmp_path / "train-000001.tar")  # its first two samples are read, the rest is lost
    items = _items(str(tmp_path), on_bad_sample="skip", shuffle=True, shuffle_buffer=4)
    assert ShardDataset(str(tmp_path))._split_mode(consumers=4) == split
    drawn = items[0] + items[1]
    skipped = [s for s in drawn if isinstance(s, Skipped)]
    assert len(skipped) == 1 and "train-000001.tar: corrupt shard: unexpected end of data" in skipped[0].message
    lost = set(range(shard_size + 2, 2 * shard_size))
    assert sorted(s["index"] for s in drawn if not isinstance(s, Skipped)) == sorted(set(range(23)) - lost)


def _damage_header(path) -> tuple[int, bytes]:
    """Flip a byte in the header of the third sample's JSON (member 4); (its offset, the shard's bytes before)."""
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[4].offset
    before = path.read_bytes()
    damaged = bytearray(before)
    damaged[offset + 10] ^= 0x55
    path.write_bytes(bytes(damaged))
    return offset, before


def test_a_damaged_header_or_a_missing_shard_is_a_bad_shard(colors, tmp_path):
    _shard(colors, tmp_path, 10)
    data = ShardDataset(str(tmp_path), on_bad_sample="skip")
    path = tmp_path / "train-000001.tar"
    _damage_header(path)
    # tarfile ends the stream at a bad header without an error: the manifest's count tells.
    with pytest.raises(BadSampleError, match=r"train-000001.tar: truncated shard: its manifest lists 10 samples, "
                                             r"read 2"):
        list(ShardDataset(str(tmp_path)))
    (tmp_path / "train-000002.tar").unlink()  # gone since it was listed
    items = list(data)
    skipped = [s.message for s in items if isinstance(s, Skipped)]
    assert len(skipped) == 2 and "train-000002.tar: corrupt shard: [Errno 2] No such file" in skipped[1]
    assert [s["index"] for s in items if not isinstance(s, Skipped)] == list(range(11))  # the last read is dropped


def test_a_damaged_header_without_a_manifest_is_found_by_walking_the_headers(colors, tmp_path):
    _shard(colors, tmp_path, 10)
    (tmp_path / "shards.json").unlink()  # shards brought without a manifest: no count to check against
    intact = list(ShardDataset(str(tmp_path)))
    assert len(intact) == 23  # an intact archive passes the walk
    path = tmp_path / "train-000001.tar"
    offset, original = _damage_header(path)
    with pytest.raises(BadSampleError, match=rf"train-000001.tar: corrupt shard: bad tar header at byte "
                                             rf"{offset} \(.*\) \(after 2 samples\)"):
        list(ShardDataset(str(tmp_path)))
    items = list(ShardDataset(str(tmp_path / "*.tar"), on_bad_sample="skip"))
    # shard 0, the first of the two samples read before the damage (the last one may be partial), shard 2
    assert sum(isinstance(s, Skipped) for s in items) == 1 and len(items) - 1 == 10 + 1 + 3
    path.write_bytes(original[:offset])  # cut at a header: no end-of-archive block
    with pytest.raises(BadSampleError, match=r"without its end-of-archive block"):
        list(ShardDataset(str(tmp_path)))
