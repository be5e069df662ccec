"""Evaluation under two processes (gloo, CPU): every test sample scored exactly once, in order."""

import json

from two_processes import spawn_two

from mllm_cl.eval.sharding import ShardSampler


def _predict_all(bench: str, batch_size: int):
    from mllm_cl.data_modules import TaskSequence

    from mllm_cl.backbones import build_preset
    from mllm_cl.data.images import ImageProcessor
    from mllm_cl.eval.evaluate import predict

    backbone = build_preset("tiny-clip-llama", seed=4)
    backbone.model.eval()
    dm = TaskSequence(benchmark=bench, template="short", eval_batch_size=batch_size)
    dm.connect(backbone.tokenizer, ImageProcessor.for_model(backbone.model), backbone.model.num_image_tokens)
    rows = predict(backbone.model, backbone.tokenizer, dm.test_dataloader(0), max_new_tokens=4, context=lambda b: None)
    return [(r["question_id"], r["text"]) for r in rows]


def _worker(rank: int, bench: str, out: str) -> None:
    rows = _predict_all(bench, batch_size=2)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(rows, f)


def test_shards_partition_without_padding():
    for n in (0, 1, 7, 8):
        shards = [list(ShardSampler(n, r, 3)) for r in range(3)]
        assert sorted(i for s in shards for i in s) == list(range(n))
        assert [len(s) for s in shards] == [len(ShardSampler(n, r, 3)) for r in range(3)]


def test_two_processes_score_each_sample_once(tmp_path):
    from mllm_cl.data.synth import generate

    generate(tmp_path / "bench", tasks=["color"], train_size=1, test_size=7, progress=False)  # odd: 4 + 3
    single = _predict_all(str(tmp_path / "bench"), batch_size=3)
    spawn_two(_worker, str(tmp_path / "bench"), str(tmp_path / "rows"), store=tmp_path / "store")
    for rank in range(2):
        rows = [tuple(r) for r in json.loads((tmp_path / f"rows.{rank}").read_text())]
        assert rows == single  # all 7, each once, in dataset order, identical answers
    assert len({q for q, _ in single}) == 7
