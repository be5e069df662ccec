"""WebDataset tar shards: writing them from the JSON formats, and streaming them for training.

``write_shards`` (``mllm-cl data shard``) turns a LLaVA conversation file (or a
test file) and its image folder into tar shards of ``NAME.png|jpg`` +
``NAME.json``, where ``NAME`` is the record's position in the input file and
the JSON is the record without its image path (the original path is kept as
``source_image``). Image bytes are copied as they are (PNG and JPEG; other
formats are re-encoded as PNG), so a shard decodes to the same pixels as the
folder. A ``shards.json`` manifest lists every shard with its sample count;
readers use it to notice a shard that ends early.

``ShardDataset`` streams shards as training samples identical to
``ConversationDataset``'s. It splits the stream over processes (ranks) and
DataLoader workers so that a plain epoch gives every sample exactly once:

- ``split="shard"``: whole shards are dealt to the rank x worker consumers
  (the efficient case: each shard is read once);
- ``split="sample"``: every consumer reads every shard and keeps the samples
  whose index falls to it (used when there are fewer shards than consumers;
  owned samples only are decoded);
- ``"auto"`` picks ``shard`` when there are at least as many shards as consumers.

Shuffling is per epoch: the shard order (the same permutation on every
consumer, so the split stays a partition) and a shuffle buffer of raw
samples per consumer. ``resample_batches`` switches to resampling: shards
drawn with replacement, exactly that many batches per rank and epoch.
``equal_ranks`` pads every consumer to the same number of samples (at most a
few repeats) so that distributed ranks run the same number of steps.

Reading is a ``webdataset.DataPipeline``: ``SimpleShardList`` (or
``ResampledShards``), the split by rank and ``split_by_worker``, each shard
read by ``tarfile_to_samples`` with a handler that records the shard's
error, ``shuffle``, and ``with_epoch`` for resampling. Its own stages do what
the library does not: a shard's sample positions (the canonical index, the
per-sample split, ``fraction`` and ``limit``), the manifest's count check,
the report of a bad shard once, and the ``equal_ranks`` padding. A damaged
tar header ends a shard's stream quietly, as ``tarfile`` reads it: the
manifest's count catches that, and a shard without a manifest has its
headers walked once after it is read (``_damaged_header``). The files are ordinary WebDataset shards,
readable by ``webdataset.WebDataset``.

Bad input gets the same ``on_bad_sample`` treatment as the JSON path: a
truncated or corrupt shard, a sample without its JSON or its image, a corrupt
image, a conversation too long; ``raise`` stops with a ``BadSampleError``
naming the shard and sample, ``skip`` yields a ``Skipped`` that the collator
drops and reports in ``batch["skipped"]`` (counted once per bad shard).
"""

from __future__ import annotations

import functools
import glob
import io
import itertools
import json
import logging
import math
import os
import random
import tarfile
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mllm_cl.data.collate import Skipped
from mllm_cl.data.datasets import conversation_item
from mllm_cl.data.errors import BadSampleError, OnBadSample, SkipLog, handle
from mllm_cl.data.formats import parse_conversation, parse_test_record, read_records
from mllm_cl.data.images import ImageBytes
from mllm_cl.distributed import world as process_world

log = logging.getLogger("mllm_cl.data")

MANIFEST = "shards.json"
FORMAT = "mllm-cl/shards"
VERSION = 1
IMAGE_EXTS = ("png", "jpg", "jpeg")


# --------------------------------------------------------------------------- writing


def _image_member(path: Path, where: str) -> tuple[str, bytes]:
    """The image as a shard member: (extension, bytes); PNG/JPEG copied verbatim, others re-encoded as PNG."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()  # a corrupt or truncated file fails here, at writing time
            if fmt == "PNG":
                return "png", data
            if fmt == "JPEG":
                return "jpg", data
            out = io.BytesIO()
            im.save(out, format="PNG")
            return "png", out.getvalue()
    except (OSError, SyntaxError, ValueError) as e:
        raise BadSampleError(where, f"corrupt image: {path} ({e})") from None


def write_shards(input_file: str | Path, image_root: str | Path | None, out_dir: str | Path, *,
                 shard_size: int = 1000, on_bad_sample: OnBadSample = "raise", skips: SkipLog | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Write ``input_file``'s records (conversations or test rows) as tar shards in ``out_dir``; return the manifest.

    Shards are named ``STEM-000000.tar`` after the input file's stem, ``shard_size``
    samples each; shards of the same stem already in ``out_dir`` are replaced. Every
    record is checked as the loaders check it (images must exist and decode): a bad one
    raises a ``BadSampleError`` naming file and record, or with ``on_bad_sample="skip"``
    is left out and counted in ``skips``.
    """
    from mllm_cl.console import Progress

    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    input_file, out_dir = Path(input_file), Path(out_dir)
    root = Path(image_root) if image_root is not None else input_file.parent
    records = read_records(input_file)
    if not records:
        raise ValueError(f"{input_file}: no records to shard")
    first = records[0]
    kind = "conversation" if isinstance(first, dict) and "conversations" in first else "test"
    parse = parse_conversation if kind == "conversation" else parse_test_record
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = input_file.stem
    (out_dir / MANIFEST).unlink(missing_ok=True)  # written last: no manifest while the shards are incomplete
    for old in out_dir.glob(f"{stem}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        old.unlink()
    skips = skips if skips is not None else SkipLog()
    shards: list[dict[str, Any]] = []
    writer = None
    bar = Progress(len(records), f"sharding {input_file.name}", "rec", enabled=progress)
    try:
        for i, record in enumerate(records):
            bar.update()
            where = f"{input_file}, record {i}"
            try:
                parsed = parse(record, root, where)
                member = None if parsed.image is None else _image_member(parsed.image, where)
            except BadSampleError as e:
                handle(e, on_bad_sample, skips)
                continue
            if writer is None or shards[-1]["samples"] >= shard_size:
                if writer is not None:
                    writer.close()
                name = f"{stem}-{len(shards):06d}.tar"
                writer = wds.TarWriter(str(out_dir / name), encoder=False, mtime=0)
                shards.append({"file": name, "samples": 0})
            body = {k: v for k, v in record.items() if k != "image"}
            if member is not None:
                body["source_image"] = record["image"]
            sample = {"__key__": f"{i:08d}", "json": json.dumps(body, ensure_ascii=False).encode("utf-8")}
            if member is not None:
                sample[member[0]] = member[1]
            writer.write(sample)
            shards[-1]["samples"] += 1
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    total = sum(s["samples"] for s in shards)
    if not total:
        raise ValueError(f"{input_file}: no usable records ({skips.total} skipped as bad)")
    manifest = {"format": FORMAT, "version": VERSION, "kind": kind, "input": str(input_file),
                "image_root": str(root), "shard_size": shard_size, "samples": total, "skipped": skips.total,
                "shards": shards}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# --------------------------------------------------------------------------- finding shards


@dataclass(frozen=True)
class ShardFile:
    """One tar shard: its path, its sample count (``None`` without a manifest) and the task it trains."""

    path: str
    samples: int | None
    task_id: int = 0


def shard_list(source: str | Path, task_id: int = 0) -> list[ShardFile]:
    """The shards ``source`` names, in order: a folder (its ``shards.json``, else its ``*.tar``),
    a ``.tar`` file, or a glob pattern. Missing files raise ``FileNotFoundError`` naming them all."""
    src = str(source)
    path = Path(src)
    if path.is_dir():
        manifest = path / MANIFEST
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{manifest}: malformed JSON at line {e.lineno}: {e.msg}") from None
            if data.get("format") != FORMAT:
                raise ValueError(f"{manifest}: not an mllm-cl shard manifest (format {data.get('format')!r})")
            if data.get("kind") != "conversation":
                raise ValueError(f"{manifest}: these shards hold {data.get('kind')} records; training needs "
                                 "conversations (shard the training file)")
            files = [ShardFile(str(path / s["file"]), int(s["samples"]), task_id) for s in data["shards"]]
            missing = [f.path for f in files if not Path(f.path).is_file()]
            if missing:
                raise FileNotFoundError(f"{manifest} lists shards that do not exist: {', '.join(missing)}")
            return files
        tars = sorted(path.glob("*.tar"))
        if not tars:
            raise FileNotFoundError(f"{path}: no {MANIFEST} and no .tar shards in this folder "
                                    "(write them with `mllm-cl data shard`)")
        return [ShardFile(str(t), None, task_id) for t in tars]
    if path.is_file():
        return [ShardFile(src, None, task_id)]
    if any(c in src for c in "*?["):
        tars = sorted(glob.glob(src))
        if tars:
            return [ShardFile(t, None, task_id) for t in tars]
    raise FileNotFoundError(f"{src}: no shards there (a folder written by `mllm-cl data shard`, a .tar file, "
                            "or a glob)")


# --------------------------------------------------------------------------- reading


@dataclass
class _Raw:
    """A sample as read from its shard, before decoding: members by extension."""

    key: str
    members: dict[str, bytes]
    shard: str
    index: int
    task_id: int


#: What reading a shard can raise about its bytes (a duplicate member name is webdataset's ValueError).
_SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, ValueError)


class _ShardErrors:
    """The ``handler`` of ``webdataset.tarfile_to_samples`` over one shard: keeps the first error
    about the shard's bytes and stops reading it; any other error propagates."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    def __call__(self, error: Exception) -> bool:
        if not isinstance(error, _SHARD_ERRORS):
            raise error
        if self.error is None:
            self.error = error
        return False

    def reason(self) -> str:
        """The error's own message, without the stream and URL webdataset appends to its arguments."""
        error = self.error
        if (isinstance(error, OSError) and error.strerror) or not error.args:
            return str(error)
        return str(error.args[0]).split(" @ ", 1)[0]


@functools.lru_cache(maxsize=1024)
def _damaged_header(path: str, size: int, mtime_ns: int) -> str | None:
    """Where an uncompressed tar's header chain breaks before its end-of-archive block (``None``: it does
    not). ``tarfile`` stops reading at such a header without an error; this walks the 512-byte headers
    (``TarInfo.frombuf`` checks each checksum) and skips each member's data. Cached per file version."""
    with open(path, "rb") as f:
        if f.read(2) in (b"\x1f\x8b", b"BZ", b"\xfd7"):  # compressed: the stream's own checks apply
            return None
        offset = 0
        while offset + 512 <= size:
            f.seek(offset)
            block = f.read(512)
            if block == bytes(512):
                return None
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                return f"bad tar header at byte {offset} ({e})"
            offset += 512 + -(-info.size // 512) * 512
    return f"the archive ends at byte {size} without its end-of-archive block"


def _split_by_rank(shards: Iterator[dict], rank: int, world: int) -> Iterator[dict]:
    """Every ``world``-th shard from the ``rank``-th: ``webdataset.split_by_node`` for the rank this
    dataset holds (webdataset reads it from the environment or ``torch.distributed``, which a
    DataLoader worker need not have, nor a dataset given its rank)."""
    return itertools.islice(shards, rank, None, world)


class ShardDataset(IterableDataset):
    """Training samples streamed from tar shards, split over ranks and DataLoader workers.

    Args:
        sources: shard sources (see ``shard_list``), one per task.
        encoder, images: the model's ``ConversationEncoder`` and ``ImageProcessor``; with
            ``encoder=None`` the stream yields the parsed ``Conversation`` (in ``"conversation"``)
            without decoding or tokenizing.
        task_ids: the task id of each source (an int for all).
        on_bad_sample: ``raise`` or ``skip`` (see ``mllm_cl.data.errors``).
        shuffle: permute the shard order every epoch and draw samples through the buffer.
        shuffle_buffer: raw samples held per consumer for shuffling (``shuffle`` only).
        seed: the base seed; an epoch's order depends on (seed, epoch).
        resample_batches: instead of plain epochs, draw shards with replacement and give
            exactly this many batches (of ``batch_size``) per rank and epoch.
        batch_size: samples per batch (needed with ``resample_batches``).
        rank, world_size: this process's place; ``None`` reads ``torch.distributed`` (set by
            ``EpochDataLoader`` in the main process) or (0, 1).
        split: ``auto``, ``shard`` or ``sample`` (see the module docstring).
        equal_ranks: pad every consumer to the same sample count (needs manifests), so that
            distributed ranks take the same number of steps; a few samples then repeat.
        fraction: keep a seeded ``fraction`` of the samples (probe phases; needs manifests).
        limit: at most the first ``limit`` samples of each source (``data.train_limit``; needs manifests).
    """

    def __init__(self, sources: str | Sequence[str], encoder=None, images=None, *,
                 task_ids: int | Sequence[int] = 0, on_bad_sample: OnBadSample = "raise", shuffle: bool = False,
                 shuffle_buffer: int = 1000, seed: int = 0, resample_batches: int | None = None,
                 batch_size: int | None = None, rank: int | None = None, world_size: int | None = None,
                 split: str = "auto", equal_ranks: bool = False, fraction: float = 1.0,
                 limit: int | None = None) -> None:
        super().__init__()
        sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
        ids = [task_ids] * len(sources) if isinstance(task_ids, int) else list(task_ids)
        if len(ids) != len(sources):
            raise ValueError(f"{len(sources)} shard sources but {len(ids)} task ids")
        if on_bad_sample not in ("raise", "skip"):
            raise ValueError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")
        if split not in ("auto", "shard", "sample"):
            raise ValueError(f"split must be 'auto', 'shard' or 'sample', got {split!r}")
        if resample_batches is not None and (resample_batches < 1 or not batch_size):
            raise ValueError("resample_batches needs a positive count and a batch_size")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        per_source = [shard_list(src, tid) for src, tid in zip(sources, ids, strict=False)]
        self.files = [f for files in per_source for f in files]
        counted = all(f.samples is not None for f in self.files)
        for need, what in ((equal_ranks, "equal_ranks"), (fraction < 1, "fraction < 1"), (limit is not None, "limit")):
            if need and not counted:
                raise ValueError(f"{what} needs the sample counts of a {MANIFEST} manifest "
                                 "(shards written by `mllm-cl data shard`)")
        # Canonical index of each shard's first sample (in the given order), where counts are known.
        self.bases: list[int] | None = None
        if counted:
            self.bases = [0]
            for f in self.files[:-1]:
                self.bases.append(self.bases[-1] + f.samples)
        self.total = sum(f.samples for f in self.files) if counted else None
        self.encoder, self.images = encoder, images
        self.on_bad_sample, self.shuffle, self.shuffle_buffer, self.seed = on_bad_sample, shuffle, shuffle_buffer, seed
        self.resample_batches, self.batch_size = resample_batches, batch_size
        self.rank, self.world_size, self.split, self.equal_ranks = rank, world_size, split, equal_ranks
        self.selected: set[int] | None = None  # canonical sample indices kept (None: all)
        if limit is not None or fraction < 1:
            universe, start = [], 0
            for files in per_source:
                count = sum(f.samples for f in files)
                universe += range(start, start + (count if limit is None else min(limit, count)))
                start += count
            if fraction < 1:
                universe = random.Random(seed).sample(universe, max(1, round(fraction * len(universe))))
            self.selected = set(universe)
        self.epoch = 0

    # ----------------------------------------------------------------- control
    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next pass follows (``EpochDataLoader`` calls it before every pass)."""
        self.epoch = epoch

    def set_world(self, rank: int, world_size: int) -> None:
        """This process's rank and the number of processes, unless given at construction."""
        if self.rank is None or self.world_size is None:
            self.rank, self.world_size = rank, world_size

    def _world(self) -> tuple[int, int]:
        pinned = self.rank is not None and self.world_size is not None
        rank, world = (self.rank, self.world_size) if pinned else process_world()
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        return rank, world

    def _split_mode(self, consumers: int) -> str:
        if self.split != "auto":
            return self.split
        if len(self.files) < consumers:
            return "sample"
        if self.equal_ranks:  # dealing shards must not cost more than one repeated sample per consumer
            counts = [self._owned(s, consumers, "shard") for s in range(consumers)]
            if max(counts) - min(counts) > 1:
                return "sample"
        return "shard"

    def epoch_batches(self, workers: int = 0) -> int:
        """Batches one process draws in the next epoch through a DataLoader with ``workers`` worker
        processes (each worker batches its own share; a bad shard adds one more item). Needs the
        manifests' sample counts, unless resampling."""
        if self.resample_batches is not None:
            return self.resample_batches
        if not self.batch_size:
            raise ValueError("counting an epoch's batches needs the batch_size")
        if self.bases is None:
            raise ValueError(f"counting an epoch's batches needs the sample counts of a {MANIFEST} manifest "
                             "(shards written by `mllm-cl data shard`)")
        rank, world = self._world()
        workers = max(1, workers)
        consumers = world * workers
        mode = self._split_mode(consumers)
        counts = [self._owned(rank + world * worker, consumers, mode) for worker in range(workers)]
        if self.equal_ranks:
            counts = [max(self._owned(s, consumers, mode) for s in range(consumers))] * workers
        return sum(math.ceil(n / self.batch_size) for n in counts)

    # --------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Any]:
        rank, world = self._world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Consumer ``slot`` is left order[slot::consumers] by the split by rank, then by worker.
        slot, consumers = rank + world * worker, world * workers
        if self.resample_batches is not None:
            batches = self.resample_batches // workers + (worker < self.resample_batches % workers)
            if not batches:
                return iter(())
            stages = [wds.ResampledShards(self._resample_candidates(), seed=self.seed, deterministic=True,
                                          worker_seed=functools.partial(wds.utils.make_seed, slot, self.epoch)),
                      functools.partial(self._samples, slot=slot, consumers=consumers, resampled=True)]
        else:
            mode = self._split_mode(consumers)
            stages = [self._shard_list()]
            if mode == "shard":
                stages += [functools.partial(_split_by_rank, rank=rank, world=world), wds.split_by_worker]
            stages.append(functools.partial(self._samples, slot=slot, consumers=consumers,
                                            owner=slot if mode == "sample" else None))
            if self.equal_ranks:
                target = max(self._owned(s, consumers, mode) for s in range(consumers))
                stages.append(functools.partial(_padded, target=target, slot=slot, consumers=consumers))
        if self.shuffle and self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                      rng=random.Random(f"{self.seed}/{self.epoch}/{slot}")))
        stages.append(self._decoded)
        pipeline = wds.DataPipeline(*stages)
        if self.resample_batches is not None:
            pipeline = pipeline.with_epoch(batches * self.batch_size)
        return iter(pipeline)

    def _shard_list(self) -> wds.SimpleShardList:
        """The epoch's shards, as shard numbers (``str(i)`` for ``self.files[i]``): permuted by
        (seed, epoch) under ``shuffle``, the same order on every consumer."""
        numbers = [str(i) for i in range(len(self.files))]
        return wds.SimpleShardList(numbers, seed=f"{self.seed}/{self.epoch}" if self.shuffle else None)

    def _order(self) -> list[int]:
        return [int(shard["url"]) for shard in self._shard_list()]

    def _resample_candidates(self) -> list[str]:
        """Shard numbers to draw from: the shards that hold kept samples."""
        candidates = range(len(self.files))
        if self.selected is not None:
            candidates = [i for i in candidates if any(
                j in self.selected for j in range(self.bases[i], self.bases[i] + self.files[i].samples))]
        return [str(i) for i in candidates]

    def _owned(self, slot: int, consumers: int, mode: str) -> int | None:
        """How many samples consumer ``slot`` gets this epoch (``None`` where counts are unknown)."""
        if self.bases is None:
            return None
        mine = self._order()[slot::consumers]
        if self.selected is None:
            if mode == "sample":
                return self.total // consumers + (slot < self.total % consumers)
            return sum(self.files[i].samples for i in mine)
        if mode == "sample":
            return sum(1 for j in self.selected if j % consumers == slot)
        return sum(1 for i in mine for j in range(self.bases[i], self.bases[i] + self.files[i].samples)
                   if j in self.selected)

    def _samples(self, shards: Iterator[dict], *, slot: int, consumers: int, owner: int | None = None,
                 resampled: bool = False) -> Iterator[Any]:
        """The samples of ``shards`` (shard numbers) this consumer keeps: all of them, or with ``owner`` the
        samples whose index falls to it; under ``fraction``/``limit``, the selected ones only."""
        running = 0  # sample index in this epoch's reading order, where counts are unknown
        idle = 0  # shards drawn in a row that gave nothing (resampling)
        for shard in shards:
            i = int(shard["url"])
            base = self.bases[i] if self.bases is not None else running
            # One consumer reports a bad shard that every consumer reads, so it is counted once.
            report = resampled or owner is None or i % consumers == slot
            n, yielded = yield from self._read(i, base, owner, consumers, report)
            if not resampled:
                running += self.files[i].samples if self.files[i].samples is not None else n
            idle = 0 if yielded else idle + 1
            if resampled and idle > 10 * len(self.files):
                raise ValueError(f"no samples in the shards {[f.path for f in self.files]}")

    def _read(self, i: int, base: int, owner: int | None, consumers: int,
              report: bool) -> Generator[Any, None, tuple[int, int]]:
        """Shard ``i``'s samples through ``webdataset.tarfile_to_samples`` (those whose index
        falls to ``owner`` where given), then a ``Skipped`` if the shard is bad and ``report``;
        returns (samples in the shard, items yielded)."""
        f = self.files[i]

        def keep(j: int) -> bool:
            return ((owner is None or j % consumers == owner)
                    and (self.selected is None or j in self.selected))

        errors = _ShardErrors()
        source = {"url": os.path.abspath(f.path)}
        n, yielded, held = 0, 0, None  # ``held``: the last sample read, complete once the shard ends well
        try:
            for sample in wds.tarfile_to_samples(handler=errors)([source]):
                if errors.error is not None:
                    break  # grouped after the error: the sample being read when it came, incomplete
                if held is not None:
                    yield held
                    yielded += 1
                held = None
                if keep(base + n):
                    members = {k: v for k, v in sample.items() if not k.startswith("__")}
                    held = _Raw(sample["__key__"], members, f.path, base + n, f.task_id)
                n += 1
        finally:
            if source.get("stream") is not None:
                source["stream"].close()
        error = None
        if errors.error is not None:
            error = BadSampleError(f.path, f"corrupt shard: {errors.reason()} (after {n} samples)")
        elif f.samples is not None and n != f.samples:
            # A tar stream cut at a member boundary, or at a damaged header, ends without an error: only
            # the count tells, and the last sample read may have lost members, so it goes with the tail.
            error = BadSampleError(f.path, f"truncated shard: its manifest lists {f.samples} samples, read {n}")
            held = None
        elif f.samples is None:
            stat = os.stat(f.path)
            damage = _damaged_header(os.path.abspath(f.path), stat.st_size, stat.st_mtime_ns)
            if damage is not None:  # the samples after the damage were never read; the last one may be partial
                error = BadSampleError(f.path, f"corrupt shard: {damage} (after {n} samples)")
                held = None
        if held is not None:
            yield held
            yielded += 1
        if error is not None and report:
            if self.on_bad_sample == "raise":
                raise error
            log.warning("skipped bad shard: %s", error)
            yield Skipped(str(error))
            yielded += 1
        return n, yielded

    def _decoded(self, items: Iterator[Any]) -> Iterator[Any]:
        """Raw samples as training samples (``Skipped`` items pass as they are)."""
        for item in items:
            yield item if isinstance(item, Skipped) else self._decode(item)

    def _decode(self, raw: _Raw) -> Any:
        where = f"{raw.shard}, sample {raw.key}"
        try:
            if "json" not in raw.members:
                raise BadSampleError(where, f"incomplete sample: no {raw.key}.json in the shard")
            try:
                record = json.loads(raw.members["json"].decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadSampleError(where, f"malformed JSON: {e}") from None
            if not isinstance(record, dict):
                raise BadSampleError(where, f"malformed record: expected an object, got {type(record).__name__}")
            source_image = record.pop("source_image", None)
            ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
            if ext is not None:
                record["image"] = f"{raw.key}.{ext}"
            elif source_image is not None:
                raise BadSampleError(where, f"incomplete sample: its image ({source_image}) is not in the shard")
            else:
                record.pop("image", None)
            data = None if ext is None else raw.members[ext]
            conv = parse_conversation(record, None, where,
                                      resolve=lambda name, _: ImageBytes(data, f"{raw.shard}:{name}"))
            if self.encoder is None:
                return {"conversation": conv, "id": conv.id, "index": raw.index, "task_id": raw.task_id}
            return {**conversation_item(conv, self.encoder, self.images, raw.task_id), "index": raw.index}
        except BadSampleError as e:
            if self.on_bad_sample == "raise":
                raise
            return Skipped(str(e))


def _padded(items: Iterator[Any], target: int, slot: int, consumers: int) -> Iterator[Any]:
    """``items``, then the first good one repeated up to ``target`` items (``equal_ranks``: ranks must
    take the same number of steps under DDP)."""
    count, first = 0, None
    for item in items:
        count += 1
        if first is None and not isinstance(item, Skipped):
            first = item
        yield item
    if count < target:
        if first is None:
            raise ValueError(f"consumer {slot} of {consumers} has no sample to repeat for equal_ranks")
        for _ in range(target - count):
            yield first


class EpochDataLoader(DataLoader):
    """A DataLoader that tells its ``ShardDataset`` the epoch (and the process's rank) before each pass.

    Lightning sets the epoch only on samplers, which an iterable dataset does not
    have, and worker processes get a copy of the dataset when a pass starts: so
    the epoch is set here, in the main process, just before the copy is made.
    Use ``persistent_workers=False`` (the workers' copies would keep the first epoch).
    """

    def __init__(self, dataset: ShardDataset, *args, **kwargs) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError("EpochDataLoader needs persistent_workers=False: workers must see each new epoch")
        super().__init__(dataset, *args, **kwargs)
        self.epochs_started = 0

    def __iter__(self):
        self.dataset.set_world(*process_world())
        self.dataset.set_epoch(self.epochs_started)
        self.epochs_started += 1
        return super().__iter__()


__all__ = ["EpochDataLoader", "MANIFEST", "ShardDataset", "ShardFile", "shard_list", "write_shards"]
