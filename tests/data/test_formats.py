"""Reading the formats users bring, and what bad input does."""

import json

import pytest

from mllm_cl.data.errors import BadSampleError, SkipLog
from mllm_cl.data.formats import load_conversations, load_test_records


def test_conversations_load_with_images_multi_turn_and_text_only(llava_dir):
    convs = load_conversations(llava_dir / "colour_train.json", llava_dir)
    assert [c.id for c in convs] == ["s1", "s2", "s3", "s4"]
    assert convs[0].turns == [("user", "<image>\nWhat colour is it?"), ("assistant", "red"),
                              ("user", "Are you sure?"), ("assistant", "yes")]
    assert convs[0].image == llava_dir / "images" / "a.png"
    assert convs[0].instruction == "<image>\nWhat colour is it?\nAre you sure?"
    assert convs[1].turns[0][1] == "<image>\nWhat colour is it?"  # placeholder added, as LLaVA does
    assert convs[2].image is None and "<image>" not in convs[2].turns[0][1]


def test_test_records_json_and_jsonl(llava_dir):
    recs = load_test_records(llava_dir / "colour_test.json", llava_dir)
    assert recs[0].prompt == "<image>\nWhat colour is it?" and recs[1].answer == ["blue", "navy"]
    assert recs[2].image is None
    (g,) = load_test_records(llava_dir / "ground_test.jsonl", llava_dir)
    assert g.as_record() == {"question_id": "g1", "text": "<image>\nWhere is it?", "answer": "[0.1, 0.2, 0.5, 0.6]",
                             "image": "images/c.png", "answer_bbox": "[0.1, 0.2, 0.5, 0.6]", "size": [40, 28]}
    assert "image" not in recs[2].as_record()  # a text-only row


def test_malformed_json_names_file_and_line(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text('[\n {"id": 1,\n  "conversations": oops}\n]')
    with pytest.raises(BadSampleError, match=r"train.json: malformed JSON at line 3"):
        load_conversations(bad)
    jl = tmp_path / "test.jsonl"
    jl.write_text('{"question_id": 1, "text": "a", "answer": "b"}\n{broken\n')
    with pytest.raises(BadSampleError, match=r"test.jsonl: malformed JSON on line 2"):
        load_test_records(jl)
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        load_conversations(tmp_path / "nope.json")


BAD_RECORDS = [
    ({"id": "x"}, "malformed record: 'conversations' must be a non-empty list"),
    ({"id": "x", "conversations": [{"from": "human", "value": "hi"}]}, "no assistant turn"),
    ({"id": "x", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "a"}]},
     "malformed record: turn 0 has unknown role 'robot'"),
    ({"id": "x", "image": "images/missing.png",
      "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "missing image: .*missing.png"),
    ({"id": "x", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
     "malformed record: '<image>' in the text but no 'image' field"),
]


@pytest.mark.parametrize("record,reason", BAD_RECORDS,
                         ids=["no-turns", "no-assistant", "role", "missing-image", "placeholder"])
def test_bad_records_raise_naming_file_and_record_or_are_skipped_and_counted(llava_dir, record, reason):
    good = json.loads((llava_dir / "colour_train.json").read_text())
    path = llava_dir / "mixed.json"
    path.write_text(json.dumps(good[:2] + [record] + good[2:]))
    with pytest.raises(BadSampleError, match=rf"mixed.json, record 2: {reason}"):
        load_conversations(path, llava_dir)
    skips = SkipLog()
    convs = load_conversations(path, llava_dir, on_bad_sample="skip", skips=skips)
    assert [c.id for c in convs] == ["s1", "s2", "s3", "s4"]
    assert skips.total == 1 and "record 2" in skips.summary("t")


def test_bad_test_rows(llava_dir):
    path = llava_dir / "t.json"
    path.write_text(json.dumps([{"question_id": "q", "text": "a"}, {"question_id": "r", "text": "a", "answer": 3}]))
    with pytest.raises(BadSampleError, match="record 0: malformed record: missing 'answer'"):
        load_test_records(path)
    skips = SkipLog()
    assert load_test_records(path, on_bad_sample="skip", skips=skips) == []
    assert skips.counts["malformed record"] == 2
    with pytest.raises(ValueError, match="on_bad_sample must be 'raise' or 'skip'"):
        load_test_records(path, on_bad_sample="ignore")
