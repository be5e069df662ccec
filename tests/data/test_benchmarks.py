"""Built-in CoIN, UCIT and MLLM-DCL definitions over sample files written in each benchmark's layout."""

import json

import pytest
import torch
from mllm_cl.data_modules import TaskSequence

from mllm_cl.backbones import build_preset
from mllm_cl.data import benchmarks
from mllm_cl.data.benchmarks import BenchmarkLayoutError, get_benchmark
from mllm_cl.data.errors import BadSampleError
from mllm_cl.data.images import ImageProcessor
from mllm_cl.eval.evaluate import score
from mllm_cl.eval.rules import CORPUS_RULES, RULES


@pytest.fixture(scope="module")
def backbone():
    return build_preset("tiny-clip-llama")


def _dm(backbone, **kw):
    dm = TaskSequence(template="short", batch_size=4, eval_batch_size=8, **kw)
    dm.connect(backbone.tokenizer, ImageProcessor.for_model(backbone.model), backbone.model.num_image_tokens)
    return dm


def test_definitions_follow_the_papers():
    assert get_benchmark("coin").task_names == ["ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding",
                                                "VQAv2", "OCRVQA"]
    assert get_benchmark("UCIT").task_names == ["ImageNet-R", "ArxivQA", "VizWiz-Caption", "IconQA", "CLEVR-Math",
                                                "Flickr30k"]
    assert get_benchmark("mllm-dcl").task_names == ["RS", "Med", "AD", "Sci", "Fin"]
    for bench in benchmarks.BENCHMARKS.values():
        for t in bench.tasks:
            assert t.scorer in RULES or t.scorer in CORPUS_RULES, t.scorer
            assert t.mode == "official" and 8 <= t.max_new_tokens <= 128
    assert [t.scorer for t in get_benchmark("coin").tasks] == [
        "coin_scienceqa", "coin_textvqa", "coin_imagenet", "coin_gqa", "coin_vizwiz", "coin_grounding", "coin_vqav2",
        "coin_ocrvqa"]
    with pytest.raises(ValueError, match="unknown benchmark 'trigap'; built-in: coin, ucit, mllm_dcl"):
        get_benchmark("trigap")


@pytest.mark.parametrize("name", ["coin", "ucit", "mllm_dcl"])
def test_sample_files_load_batch_and_score_through_the_definition(name, make_benchmark, gold_answers, backbone):
    root = make_benchmark(name)
    bench = get_benchmark(name)
    dm = _dm(backbone, benchmark=name, root=str(root))
    assert dm.task_names == bench.task_names
    for i, (spec, tdef) in enumerate(zip(dm.tasks, bench.tasks, strict=False)):
        assert (spec.scorer, spec.max_new_tokens) == (tdef.scorer, tdef.max_new_tokens)
        dm.set_task(i)
        (batch,) = list(dm.train_dataloader())
        assert sorted(batch["ids"]) == [f"{spec.name}-train-{k}" for k in range(3)]
        assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["has_image"].sum() == 2
        if i == 0:
            loss = backbone.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                  pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
            assert torch.isfinite(loss)
        (test,) = list(dm.test_dataloader(i))
        records = test["records"]
        assert [r["question_id"] for r in records] == ["100", "101"] and test["pixel_values"].shape[0] == 2
        gold = gold_answers[spec.scorer]
        if spec.annotation_format == "coco_captions":  # references from val_coco_type_3000.json, by position
            assert [r["answer"] for r in records] == [[g, g + " today"] for g in gold]
        if spec.annotation_format == "textvqa":  # the ten human answers from the annotation, not the row's answer
            assert [r["answer"] for r in records] == [[g] * 10 for g in gold]
        right = [{"text": g, "record": r} for g, r in zip(gold, records, strict=False)]
        wrong = [{"text": "zzz", "record": r} for r in records]
        if spec.scorer in CORPUS_RULES:  # the caption scorers run Java: tests/eval/test_captions.py (slow)
            continue
        assert score(right, spec.scorer, "official") == 100.0, spec.name
        assert score(wrong, spec.scorer, "official") == 0.0, spec.name


def test_mllm_dcl_sci_scores_by_the_image_name_kept_in_the_row(make_benchmark, backbone):
    dm = _dm(backbone, benchmark="mllm_dcl", root=str(make_benchmark("mllm_dcl")), order=["Sci"])
    (record, _) = [r for b in dm.test_dataloader(0) for r in b["records"]]
    assert record["image"] == "imgs/Sci/AI2D_test_0.png"
    assert score([{"text": "b", "record": record}], "mllm_dcl_sci") == 100.0  # AI2D: lower-case equality


def test_missing_files_are_one_error_listing_every_path_and_the_layout(make_benchmark):
    root = make_benchmark("coin")
    (root / "Instructions/GQA/test.json").unlink()
    (root / "cl_dataset/TextVQA/TextVQA_0.5.1_val.json").unlink()
    (root / "Instructions/OCRVQA/train.json").unlink()
    with pytest.raises(BenchmarkLayoutError) as e:
        TaskSequence(benchmark="coin", root=str(root))
    message = str(e.value)
    assert f"benchmark coin (data.root={root}): 3 missing path(s)" in message
    assert f"{root}/Instructions/GQA/test.json   [GQA test]" in message
    assert f"{root}/cl_dataset/TextVQA/TextVQA_0.5.1_val.json   [TextVQA annotation]" in message
    assert f"{root}/Instructions/OCRVQA/train.json   [OCRVQA train]" in message
    assert "expected layout under data.root" in message and "Instructions/ScienceQA/train.json" in message
    # A subset in `order` is all that must exist.
    assert TaskSequence(benchmark="coin", root=str(root), order=["VQAv2", "ScienceQA"]).task_names == ["VQAv2",
                                                                                                       "ScienceQA"]
    with pytest.raises(BenchmarkLayoutError, match=r"1 missing path\(s\):\n  - .*nowhere \(the root folder itself\)"):
        TaskSequence(benchmark="ucit", root=str(root / "nowhere"))


def test_instruction_variants_and_alternative_folder_names(make_benchmark):
    root = make_benchmark("coin")
    (root / "Instructions").rename(root / "Instructions_Diverse")
    with pytest.raises(BenchmarkLayoutError, match="8 tasks|16 missing"):
        TaskSequence(benchmark="coin", root=str(root))
    dm = TaskSequence(benchmark="coin", root=str(root), paths={"instructions": "Instructions_Diverse"})
    assert dm.tasks[0].train == str(root / "Instructions_Diverse/ScienceQA/train.json")
    assert dm.tasks[1].test.endswith("Instructions_Diverse/TextVQA/val.json")
    with pytest.raises(ValueError, match=r"data.paths.instruction: benchmark coin has no such path \(its paths: "
                                         r"instructions, images\)"):
        TaskSequence(benchmark="coin", root=str(root), paths={"instruction": "x"})
    ucit = make_benchmark("ucit")  # HiDe-LLaVA's folder names instead of MCITlib's
    for mcitlib, hide in (("VizWiz-caption", "VizWiz"), ("CLEVR-Math", "CLEVR"), ("Flickr30k-cap", "Flickr30k")):
        (ucit / mcitlib).rename(ucit / hide)
    specs = benchmarks.resolve("ucit", ucit)
    assert specs[2].annotation == str(ucit / "VizWiz/val_coco_type_3000.json")
    assert specs[4].train == str(ucit / "CLEVR/train_4w.json")


def test_config_mistakes_are_named(make_benchmark, tmp_path):
    with pytest.raises(ValueError, match=r"data.benchmark 'coin' needs data.root.*\n.*ROOT/\n"):
        TaskSequence(benchmark="coin")
    with pytest.raises(ValueError, match="data.root and data.paths go with a built-in benchmark"):
        TaskSequence(benchmark=str(tmp_path / "benchmark.json"), root=str(tmp_path))
    with pytest.raises(ValueError, match="benchmark mllm_dcl has no task 'Bio'"):
        TaskSequence(benchmark="mllm_dcl", root=str(make_benchmark("mllm_dcl")), order=["RS", "Bio"])


def test_annotation_without_a_rows_answers_names_the_row(make_benchmark, backbone):
    root = make_benchmark("coin")
    ann = root / "cl_dataset/TextVQA/TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps({"data": [{"question_id": 100, "answers": ["stop"] * 10}]}))
    dm = _dm(backbone, benchmark="coin", root=str(root), order=["TextVQA"])
    with pytest.raises(BadSampleError, match=r"TextVQA/val.json, record 1: no answers in annotation .* "
                                             r"for question_id 101"):
        dm.test_dataset(0)
    dm = _dm(backbone, benchmark="coin", root=str(root), order=["TextVQA"], on_bad_sample="skip")
    assert len(dm.test_dataset(0)) == 1  # test rows dropped on reading are counted apart from training skips
    assert "1 x no answers in annotation" in dm.eval_skips(0, []).summary("TextVQA")


def test_the_cli_shows_and_checks_layouts(make_benchmark, capsys):
    from mllm_cl.cli import main

    assert main(["data", "benchmarks"]) == 0
    assert "coin      CoIN (NeurIPS 2024): ScienceQA -> TextVQA" in capsys.readouterr().out
    assert main(["data", "benchmarks", "ucit"]) == 0
    out = capsys.readouterr().out
    assert "ucit_vizwiz_caption" in out and "ArxivQA/train_4w.json" in out
    root = make_benchmark("mllm_dcl")
    assert main(["data", "benchmarks", "mllm_dcl", "--root", str(root)]) == 0
    assert "every file of the 5 tasks is in place" in capsys.readouterr().out
    (root / "Fin/test.json").unlink()
    assert main(["data", "benchmarks", "mllm_dcl", "--root", str(root)]) == 1
    assert f"{root}/Fin/test.json   [Fin test]" in capsys.readouterr().err


@pytest.mark.slow  # 20-60 s on 2 cores: a whole fit; generation to the definitions' budgets dominates
def test_fit_runs_a_built_in_benchmark_from_its_root_and_shards(make_benchmark, tmp_path):
    from pathlib import Path

    from mllm_cl.data.shards import write_shards
    from mllm_cl.fit import main as fit_main

    configs = Path(__file__).resolve().parents[2] / "configs"
    root = make_benchmark("mllm_dcl")
    for task in ("RS", "Med"):
        write_shards(root / task / "train.json", root / task, tmp_path / "shards" / task, shard_size=2, progress=False)
    fit_main(["--config", str(configs / "micro.yaml"), "--config", str(configs / "methods/lora_ft.yaml"),
              "--data.benchmark", "mllm_dcl", "--data.root", str(root), "--data.shards", str(tmp_path / "shards"),
              "--data.order", "[RS, Med]", "--data.num_workers", "2", "--data.test_limit", "1",
              "--trainer.default_root_dir", str(tmp_path / "run")])
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["tasks"] == [{"name": "RS", "scorer": "mllm_dcl_rs", "mode": "official"},
                                {"name": "Med", "scorer": "mllm_dcl_med", "mode": "official"}]
    assert results["completed_tasks"] == 2 and results["matrix"][1][1] is not None
