"""The synthetic benchmark: procedural image-instruction tasks that run on a CPU.

Each task has its own instruction phrasing and answer format (format
interference is the main cause of forgetting reported on CoIN) and the scorer
of its kind (docs/synthetic.md, docs/scorers.md). Everything is derived from
``(seed, task, split, index)`` with a stable hash, so the same seed gives
byte-identical files and train and test never share an image.

    generate("data/synth", train_size=300, test_size=100, image_size=48, seed=0)

writes ``NAME/train.json`` (LLaVA conversations), ``NAME/test.json`` (test rows),
``NAME/images/*.png`` per task and a ``benchmark.json`` manifest (each task's scorer,
answer format and visual domain; the source and licence of data no one here drew).

Two knobs make each task's prompt tokens easier to tell apart, for studies of token-level
routing (``examples/routing_separability/``); both are off by default, and off they leave
every file byte-identical:

- ``instruction_first``: the user turn is ``{instruction}\n<image>`` instead of
  ``<image>\n{instruction}``, so that under causal attention the image's tokens see the
  instruction (the encoder expands ``<image>`` wherever it stands).
- ``tint`` (``s`` in [0, 1]): every image of a task, train and test, is blended with that task's
  own colour (``tint_colours``: hues evenly spaced over the tasks written) with weight ``s``:
  ``(1 - s) * image + s * colour``. ``s = 1`` leaves a plain colour and no picture.

Two suites (``SUITES``): ``shapes``, the tasks below, all on one background (the
first canonical sequence, ``configs/experiments/synth.yaml``); ``coin``, eight tasks
in CoIN's order over six visual domains, one of real handwritten digits
(``synth_coin``; ``configs/experiments/coin_like.yaml``).
"""

from __future__ import annotations

import colorsys
import json
import logging
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from mllm_cl.console import Progress
from mllm_cl.data.domains import FONT_SOURCE
from mllm_cl.data.draw import COLOURS, SHAPES, box_text, place, render, render_word, scene_caption
from mllm_cl.data.real_images import DIGITS_SOURCE
from mllm_cl.data.synth_coin import COIN_ORDER, COIN_TASKS
from mllm_cl.data.synth_spec import Sample, TaskSpec, pick, radius

log = logging.getLogger(__name__)

FORMAT = "mllm-cl/synthetic"
# 2: OCR words scaled by the largest whole factor that fits, in one of four inks;
# 3: the CoIN-shaped suite (``synth_coin``); the shape-scene tasks' files are byte-identical to version 2's.
VERSION = 3
WORDS = ("cat", "dog", "sun", "box", "map", "pen", "cup", "key", "bus", "hat", "owl", "fox", "jam", "kit", "web", "zip")


def _classify(rng, size):
    shape, colour = pick(rng, SHAPES)[0], pick(rng, list(COLOURS))[0]
    objs = place(rng, size, [(shape, colour, radius(size, 0.22, 0.32, rng))])
    return Sample(render(objs, size), "What shape is shown in the image?", shape, {}, tuple(objs))


def _color(rng, size):
    n = int(rng.integers(1, 4))
    shapes, colours = pick(rng, SHAPES, n), pick(rng, list(COLOURS), n)
    objs = place(rng, size, [(s, c, radius(size, 0.12, 0.18, rng)) for s, c in zip(shapes, colours, strict=False)])
    target = objs[int(rng.integers(n))]
    return Sample(render(objs, size), f"What color is the {target.shape}?", target.colour, {}, tuple(objs))


def _count(rng, size):
    n = int(rng.integers(1, 6))
    shape, other = pick(rng, SHAPES, 2)
    colour, other_colour = pick(rng, list(COLOURS), 2)
    distract = int(rng.integers(0, 2))  # at most one distractor, of another shape and colour
    specs = [(shape, colour, radius(size, 0.08, 0.1, rng)) for _ in range(n)]
    specs += [(other, other_colour, radius(size, 0.08, 0.1, rng)) for _ in range(distract)]
    objs = place(rng, size, specs)
    return Sample(render(objs, size), f"How many {shape}s are there?", str(n), {}, tuple(objs))


def _ocr(rng, size):
    word = pick(rng, WORDS)[0]
    return Sample(render_word(word, size, rng), "What word is written in the image?", word, {})


def _ground(rng, size):
    n = int(rng.integers(1, 4))
    shapes, colours = pick(rng, SHAPES, n), pick(rng, list(COLOURS), n)
    objs = place(rng, size, [(s, c, radius(size, 0.12, 0.2, rng)) for s, c in zip(shapes, colours, strict=False)])
    target = objs[int(rng.integers(n))]
    box = box_text(target, size)
    return Sample(render(objs, size), f"Where is the {target.colour} {target.shape}? Answer with a bounding box.",
                  box, {"answer_bbox": box, "size": [size, size]}, tuple(objs))


def _choice(rng, size):
    n = int(rng.integers(2, 5))
    shapes = pick(rng, SHAPES, n)
    colours = pick(rng, list(COLOURS), n)
    # Distinct sizes: the largest is 45% larger than the next. Two draws that round alike
    # would merge in the set and drop an object, so redraw then (a scene without a
    # collision keeps the draws, and so the data, it always had).
    for _ in range(100):
        radii = sorted({round(size * f, 1) for f in rng.uniform(0.08, 0.13, n)})
        if len(radii) == n:
            break
    else:
        raise ValueError(f"choice: could not draw {n} distinct sizes on a {size}px image")
    radii[-1] = round(radii[-1] * 1.45, 1)
    rng.shuffle(radii)
    objs = place(rng, size, [(s, c, r) for s, c, r in zip(shapes, colours, radii, strict=False)])
    largest = max(objs, key=lambda o: o.r).shape
    options = list(shapes) + pick(rng, [s for s in SHAPES if s not in shapes], 4 - n)
    options = [options[i] for i in rng.permutation(4)]
    letters = "ABCD"
    listing = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
    return Sample(render(objs, size), f"Which shape is the largest?\n{listing}\nAnswer with the option's letter.",
                  letters[options.index(largest)], {}, tuple(objs))


def _spatial(rng, size):
    shapes, colours = pick(rng, SHAPES, 2), pick(rng, list(COLOURS), 2)
    for _ in range(100):
        objs = place(rng, size, [(s, c, radius(size, 0.1, 0.15, rng)) for s, c in zip(shapes, colours, strict=False)])
        if abs(objs[0].cx - objs[1].cx) > size * 0.15:  # clearly left or right
            break
    else:
        raise ValueError(f"spatial: could not separate two objects on a {size}px image")
    want_yes = bool(rng.integers(2))
    a, b = (objs if (objs[0].cx < objs[1].cx) == want_yes else objs[::-1])
    question = f"Is the {a.colour} {a.shape} to the left of the {b.colour} {b.shape}? Answer yes or no."
    return Sample(render(objs, size), question, "yes" if a.cx < b.cx else "no", {}, tuple(objs))


def _caption(rng, size):
    n = int(rng.integers(1, 4))
    shapes, colours = pick(rng, SHAPES, n), pick(rng, list(COLOURS), n)
    objs = place(rng, size, [(s, c, radius(size, 0.1, 0.16, rng)) for s, c in zip(shapes, colours, strict=False)])
    return Sample(render(objs, size), "Describe the scene.", scene_caption(objs, size), {}, tuple(objs))


# max_new_tokens leaves room for a byte-level tokenizer: one token per character, a space, EOS.
SHAPE_TASKS: dict[str, TaskSpec] = {
    "classify": TaskSpec(_classify, "exact_match", 12, "a shape name"),
    "color": TaskSpec(_color, "exact_match", 10, "a colour word"),
    "count": TaskSpec(_count, "exact_match", 4, "a digit"),
    "ocr": TaskSpec(_ocr, "exact_match", 8, "the written word", "words"),
    "ground": TaskSpec(_ground, "grounding_iou", 30, "a box [x1, y1, x2, y2] normalized to the image"),
    "choice": TaskSpec(_choice, "option_accuracy", 4, "an option letter"),
    "spatial": TaskSpec(_spatial, "exact_match", 6, "yes or no"),
    "caption": TaskSpec(_caption, "caption", 128, "a sentence listing every object and where it is"),
}
#: Every synthetic task, by name.
TASKS: dict[str, TaskSpec] = {**SHAPE_TASKS, **COIN_TASKS}
#: The two suites: ``shapes`` (one domain, the first canonical sequence's; the default) and
#: ``coin`` (CoIN's structure: eight tasks over six domains, and their caption task).
SUITES: dict[str, tuple[str, ...]] = {"shapes": tuple(SHAPE_TASKS), "coin": COIN_ORDER + ("describe",)}
_SPLITS = {"train": 0, "test": 1}


def sample(task: str, split: str, index: int, *, seed: int = 0, image_size: int = 48) -> Sample:
    """One sample, a pure function of its coordinates."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), _SPLITS[split], index])
    spec = TASKS[task]
    return spec.make(rng, image_size, split) if spec.takes_split else spec.make(rng, image_size)


def tint_colours(tasks: list[str]) -> dict[str, tuple[int, int, int]]:
    """Each task's tint: fully saturated hues evenly spaced over ``tasks`` in their order (the first red)."""
    return {task: tuple(round(255 * c) for c in colorsys.hsv_to_rgb(k / len(tasks), 1.0, 1.0))
            for k, task in enumerate(tasks)}


def tint_image(image: Image.Image, colour: tuple[int, int, int], strength: float) -> Image.Image:
    """``(1 - strength) * image + strength * colour`` per pixel, rounded; strength 0 returns ``image`` itself."""
    if strength == 0:
        return image
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    blended = (1.0 - strength) * pixels + strength * np.asarray(colour, dtype=np.float64)
    return Image.fromarray(np.rint(blended).clip(0, 255).astype(np.uint8), "RGB")


def prompt_text(instruction: str, instruction_first: bool = False) -> str:
    """The user turn: the image placeholder, then the instruction (or the instruction first)."""
    return f"{instruction}\n<image>" if instruction_first else f"<image>\n{instruction}"


def _check_knobs(instruction_first, tint) -> float:
    if not isinstance(instruction_first, (bool, np.bool_)):
        raise ValueError(f"instruction_first must be true or false, got {instruction_first!r}")
    if isinstance(tint, bool) or not isinstance(tint, (int, float, np.integer, np.floating)) \
            or not (0.0 <= float(tint) <= 1.0):  # NaN fails the comparison
        raise ValueError(f"tint must be a number in [0, 1], got {tint!r}")
    return float(tint)


def _task_list(tasks, suite: str | None) -> list[str]:
    if suite is not None and suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
    if tasks is None:
        return list(SUITES[suite or "shapes"])
    if suite is not None:
        raise ValueError("give tasks or a suite, not both")
    return [tasks] if isinstance(tasks, str) else list(tasks)  # a lone name is not split into letters


def _sources(tasks: list[str]) -> list[dict]:
    """What the manifest says about data no one here drew (real images, fonts)."""
    domains = {TASKS[t].domain for t in tasks}
    mixed = "mixed" in domains
    out = []
    if mixed or "digits" in domains:
        out.append(DIGITS_SOURCE)
    if mixed or domains & {"signs", "covers"}:
        out.append(FONT_SOURCE)
    return out


def _dump(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def generate(out_dir, *, tasks=None, suite: str | None = None, train_size: int = 300, test_size: int = 100,
             image_size: int = 48, seed: int = 0, instruction_first: bool = False, tint: float = 0.0,
             progress: bool = True) -> dict:
    """Write the benchmark under ``out_dir``; returns the manifest (also written as benchmark.json).
    ``tasks`` or ``suite`` (see ``SUITES``) name what to write; neither: the ``shapes`` suite.
    ``instruction_first`` and ``tint``: the knobs of the module's docstring; the manifest records them
    (``instruction_first``, ``tint`` and each task's ``tint_colour``) only when they are on."""
    tasks = _task_list(tasks, suite)
    tint = _check_knobs(instruction_first, tint)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; tasks: {', '.join(TASKS)}")
    if not tasks:
        raise ValueError(f"no tasks given; tasks: {', '.join(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks repeat: {tasks}")
    for name, value in (("train_size", train_size), ("test_size", test_size), ("image_size", image_size),
                        ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if train_size < 1 or test_size < 1:
        raise ValueError(f"train and test sizes must be positive, got {train_size} and {test_size}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if seed < 0:  # numpy's SeedSequence takes non-negative entropy only
        raise ValueError(f"seed must be non-negative, got {seed}")
    out = Path(out_dir)
    entries = []
    colours = tint_colours(tasks)
    bar = Progress(len(tasks) * (train_size + test_size), "synthetic benchmark", "img", enabled=progress)
    for task in tasks:
        folder = out / task
        (folder / "images").mkdir(parents=True, exist_ok=True)
        # Images left by an earlier, larger run would make the folder depend on its history.
        keep = {f"{task}_{split}_{i:05d}.png" for split, n in (("train", train_size), ("test", test_size))
                for i in range(n)}
        for stale in (folder / "images").glob(f"{task}_*.png"):
            if stale.name not in keep:
                stale.unlink()
        train, test = [], []
        for split, n in (("train", train_size), ("test", test_size)):
            for i in range(n):
                s = sample(task, split, i, seed=seed, image_size=image_size)
                name = f"images/{task}_{split}_{i:05d}.png"
                tint_image(s.image, colours[task], tint).save(folder / name, format="PNG", optimize=False)
                prompt = prompt_text(s.instruction, instruction_first)
                if split == "train":
                    train.append({"id": f"{task}_train_{i:05d}", "image": name, "conversations": [
                        {"from": "human", "value": prompt}, {"from": "gpt", "value": s.answer}]})
                else:
                    test.append({"question_id": f"{task}_test_{i:05d}", "image": name, "text": prompt,
                                 "answer": s.answer, **s.extra})
                bar.update()
        _dump(folder / "train.json", train)
        _dump(folder / "test.json", test)
        spec = TASKS[task]
        entries.append({"name": task, "scorer": spec.scorer, "train": f"{task}/train.json", "test": f"{task}/test.json",
                        "image_root": task, "max_new_tokens": spec.max_new_tokens, "answer_format": spec.answer_format,
                        "domain": spec.domain, **({"tint_colour": list(colours[task])} if tint else {})})
    bar.close()
    manifest = {"format": FORMAT, "version": VERSION, "seed": seed, "image_size": image_size,
                "train_size": train_size, "test_size": test_size, "tasks": entries}
    # Recorded only when on, so that the default manifest stays what it always was.
    if instruction_first:
        manifest["instruction_first"] = True
    if tint:
        manifest["tint"] = tint
    sources = _sources(tasks)
    if sources:
        manifest["sources"] = sources
    _dump(out / "benchmark.json", manifest)
    return manifest


def ensure(out_dir, *, tasks=None, suite: str | None = None, train_size: int = 300, test_size: int = 100,
           image_size: int = 48, seed: int = 0, instruction_first: bool = False, tint: float = 0.0,
           progress: bool = True) -> bool:
    """Generate the benchmark under ``out_dir`` unless its manifest already records this
    generator version and these arguments; returns whether it (re)generated. A folder
    written by another version or with other sizes or knobs is regenerated, with a log line
    saying why, rather than trained on as if it were the asked-for data."""
    path = Path(out_dir, "benchmark.json")
    tasks = _task_list(tasks, suite)
    tint = _check_knobs(instruction_first, tint)
    want = {"format": FORMAT, "version": VERSION, "seed": seed, "image_size": image_size,
            "train_size": train_size, "test_size": test_size, "tasks": tasks,
            "instruction_first": bool(instruction_first), "tint": tint}
    knobs = {"instruction_first": False, "tint": 0.0}  # a manifest without them was written with them off
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
            have = {k: manifest.get(k, knobs.get(k)) for k in want if k != "tasks"}
            have["tasks"] = [t.get("name") for t in manifest.get("tasks", [])]
        except (json.JSONDecodeError, AttributeError, TypeError):
            have = {"manifest": "unreadable"}
        if have == want:
            return False
        differ = sorted(k for k in want if have.get(k) != want[k]) or ["manifest"]
        log.warning("%s was generated with other settings (%s differ); regenerating it", path, ", ".join(differ))
    generate(out_dir, tasks=tasks, train_size=train_size, test_size=test_size, image_size=image_size, seed=seed,
             instruction_first=instruction_first, tint=tint, progress=progress)
    return True
