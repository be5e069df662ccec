"""Host round trips per forward of every method, counted on the CPU (``mllm_cl.system.host_syncs``).

On a GPU every read-back of a device value (``.item()``, ``.tolist()``, ``nonzero()``, ``if mask.any():``,
a boolean-mask index) and every copy of a Python list onto it makes the host wait for the device; one
per adapted module is a few hundred stalls per forward of a 32-layer model. There,
``torch.cuda.set_sync_debug_mode("error")`` is the check; here the same calls are counted in the CPU's
run of the code.

Every method, and the oracle (``route_by``) of each routed one, trains two tasks as the continual loop
runs them (routing after its gate phase: the gates exist when task 1 trains and when it decodes) on the
tiny backbone with 2 and with 4 decoder layers of 4 adapted modules, then generates with a KV cache
(``method_syncs``). Then:

- per forward (training, the gradient hooks of a step, the evaluation context, prefill, a decoding
  step) the count, call site by call site, is the same with 2 and 4 layers: nothing is read back per
  layer or per adapted module;
- a training forward and a decoding step make only the calls named in ``KEPT``, each once per forward,
  for the reason given there.
"""

import pytest
import torch

from mllm_cl.system.host_syncs import METHODS, count_host_syncs, method_syncs

#: The host round trips a forward keeps (kind, file, function), once per forward whatever the layers.
KEPT = {
    "embed": (("item", "mllm_cl/backbones/composed.py", "embed"),
              "the backbone counts the prompt's image placeholders to check them against the images "
              "(a forward that embeds a prompt; a decoding step does not)"),
    "sdpa_mask": (("bool", "transformers/masking_utils.py", "_ignore_causal_mask_sdpa"),
                  "transformers checks whether SDPA can drop the attention mask, once per forward"),
    "task_ids": (("tolist", "mllm_cl/experts/routing.py", "host_list"),
                 "routing by task id reads the batch's task ids once per routing context: which expert a "
                 "task id names is host-side structure (an unknown id is refused by name), and only the "
                 "batch's task experts run and get gradients"),
    "instruction": (("tensor", "mllm_cl/methods/routing_encoder.py", "_backbone_text"),
                    "the routing encoder's instruction tokens come from the tokenizer on the host: one copy "
                    "to the device per forward"),
    "same_prior_tasks": (("tolist", "mllm_cl/methods/same.py", "_accumulate"),
                         "SAME keeps its task prior's anchors per task id, a host-side key: the batch's "
                         "task set is read once per training forward"),
    "same_prior_unique": (("shape", "mllm_cl/methods/same.py", "_accumulate"), "(the same task set)"),
    "same_prior_rows": (("mask_index", "mllm_cl/methods/same.py", "_accumulate"),
                        "(each of the batch's tasks' samples, selected for its anchor sums)"),
}
_BASE = {"embed", "sdpa_mask"}
_SAME = _BASE | {"instruction", "same_prior_tasks", "same_prior_unique", "same_prior_rows"}
#: What a training forward of each method keeps.
TRAIN_KEPT = {"lora_ft": _BASE, "moelora": _BASE, "individual": _BASE | {"task_ids"}, "routing": _BASE,
              "routing:task_id": _BASE, "same": _SAME, "same:task_id": _SAME, "cram": _BASE | {"instruction"},
              "cram:task_id": _BASE | {"instruction"}, "cram:task_slot": _BASE | {"instruction"},
              "cmoe": _BASE, "cmoe:task_id": _BASE}
#: A decoding step keeps only transformers' mask check: prefill routing is reused, task ids were read.
DECODE_KEPT = {"sdpa_mask"}
#: Top-k routing over trainable experts: which experts got no token is read back once per optimizer step
#: (their gradients are dropped before it, so AdamW does not move them), for every layer at once.
STEP_KEPT = ("tolist", "mllm_cl/experts/layer.py", "_drop_unrouted")


def _allowed(names: set[str]) -> set[tuple[str, str, str]]:
    return {KEPT[n][0] for n in names}


def _matches(place: tuple[str, str, str], allowed: set[tuple[str, str, str]]) -> bool:
    kind, path, function = place
    return any(kind == k and path.replace("\\", "/").endswith(p) and function == f for k, p, f in allowed)


@pytest.fixture(scope="module")
def runs():
    cache = {}

    def get(name: str, layers: int):
        if (name, layers) not in cache:
            cache[(name, layers)] = method_syncs(name, layers)
        return cache[(name, layers)]
    return get


def test_every_registered_method_is_measured():
    import mllm_cl.methods as methods

    measured = {m.partition(":")[0] for m in METHODS}
    registered = {cls.name for cls in map(methods.__dict__.get, methods.__all__)
                  if isinstance(cls, type) and issubclass(cls, methods.Method) and cls is not methods.Method}
    # zero_shot adds no expert layer; multitask trains the same single expert as lora_ft.
    assert registered - measured == {"zero_shot", "multitask"}
    assert set(TRAIN_KEPT) == set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_no_forward_reads_back_per_layer(runs, name):
    small, large = runs(name, 2), runs(name, 4)
    assert small.keys() == large.keys()
    assert {k for k in small if k.startswith("train:")} and {"context", "prefill", "decode"} <= small.keys()
    for key in small:
        assert small[key].places() == large[key].places(), (
            f"{name} {key}: the count grows with the layers\n2 layers: {small[key]}\n4 layers: {large[key]}")


@pytest.mark.parametrize("name", METHODS)
def test_training_and_decoding_keep_only_the_named_round_trips(runs, name):
    out = runs(name, 4)
    for key, syncs in out.items():
        if key.startswith("train:"):
            allowed = _allowed(TRAIN_KEPT[name])
        elif key == "decode":
            allowed = _allowed(DECODE_KEPT)
        elif key.startswith("step:"):
            allowed = {STEP_KEPT}
        else:
            continue
        unexpected = [p for p in syncs.places() if not _matches(p, allowed)]
        assert not unexpected, f"{name} {key}: host round trips not in KEPT\n{syncs}"
        assert all(n == 1 for p, n in syncs.places().items() if p[1] != "mllm_cl/methods/same.py"), \
            f"{name} {key}: a kept round trip more than once per forward\n{syncs}"


def test_only_top_k_routing_reads_unrouted_experts_back_at_the_step(runs):
    step = runs("cmoe", 4)["step:train"]
    assert step.total == 1 and _matches(next(iter(step.places())), {STEP_KEPT})
    for name in ("lora_ft", "moelora", "individual", "routing", "same", "cram"):
        assert all(s.total == 0 for k, s in runs(name, 4).items() if k.startswith("step:")), name


def test_the_counter_names_each_kind_and_restores_torch():
    before = {n: torch.Tensor.__dict__.get(n) for n in ("item", "tolist", "__bool__", "__getitem__")}
    x = torch.arange(6.0).view(2, 3)
    with count_host_syncs() as syncs:
        x.sum().item()
        x.tolist()
        if (x > 2).any():
            x.nonzero()
        x[x > 2]
        x[:, [0, 2]]
        torch.tensor([1, 2])
        torch.tensor([])  # copies nothing
        x.new_tensor(3.0)
        x.unique()
        torch.repeat_interleave(x, torch.tensor([1, 2]), dim=0)
        x.repeat_interleave(2, dim=0)  # a count known on the host
        torch.where(x > 2, x, 0)  # three arguments: no nonzero
        x.cpu()
    assert dict(syncs.kinds) == {"item": 1, "tolist": 1, "bool": 1, "nonzero": 1, "mask_index": 1, "tensor": 4,
                                 "shape": 2, "cpu": 1}
    assert {n: torch.Tensor.__dict__.get(n) for n in before} == before
    assert bool(x.sum() > 0) and x.sum().item() == 15.0


class _ReadsBack(torch.nn.Module):
    def forward(self, x):
        return x * x.sum().item()


def test_per_call_splits_the_count_per_forward():
    model, x = _ReadsBack(), torch.randn(2, 3)
    with count_host_syncs(per_call=model) as syncs:
        model(x)
        x.sum().item()  # between the forwards: in the whole only
        model(x)
    assert [c.total for c in syncs.calls] == [1, 1] and syncs.total == 3


def test_a_context_reads_its_task_ids_once_for_every_subset_and_layer():
    from mllm_cl.experts import RoutingContext
    from mllm_cl.experts.routing import index_on

    ctx = RoutingContext(task_ids=torch.tensor([3, -1, 5, 3]), router_choice=["a", "b", "a", "a"])
    with count_host_syncs() as syncs:
        for _ in range(3):  # three layers
            rows = ctx.router_rows(torch.device("cpu"))
            subsets = [ctx.subset(index, pick) for pick, index in rows.values()]
            ids = [s.host_list("task_ids") for s in subsets]
    assert syncs.places() == {("tolist", "mllm_cl/experts/routing.py", "host_list"): 1}
    assert ids == [[3, 5, 3], [-1]] and [s.task_ids.tolist() for s in subsets] == ids
    assert ctx.router_rows(torch.device("cpu")) is rows  # made once per context
    for values in ([], [4], [0, 1, 2], [2, 2, 0, -1, 5, 6, 6]):
        assert index_on("cpu", values).tolist() == values


def test_one_call_drops_the_unrouted_gradients_of_every_layer():
    from torch import nn

    from mllm_cl.experts import ExpertLayer, Router, Routing
    from mllm_cl.experts.injection import inject_experts

    class Given(Router):
        def forward(self, x, context):
            idx = torch.zeros(*x.shape[:-1], 1, dtype=torch.long)  # every token to e0
            return Routing(weights=torch.ones(idx.shape), indices=idx)

    holder = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    inject_experts(holder, ["0", "1"], lambda n, lin: ExpertLayer(lin, router=Given(8), rank=2), scope="")
    for layer in (holder[0], holder[1]):
        for name in ("e0", "e1", "e2"):
            nn.init.normal_(layer.add_expert(name).B)
    holder(torch.randn(2, 3, 8)).sum().backward()
    assert all(p.grad is not None for p in holder.parameters() if p.requires_grad)  # in the graph: zero
    with count_host_syncs() as syncs:
        holder[0].apply_gradient_transforms()  # the first layer's hook reads back every layer's notes
        holder[1].apply_gradient_transforms()
    assert syncs.total == 1
    for layer in (holder[0], holder[1]):
        assert layer.experts["e0"].A.grad is not None
        assert all(p.grad is None for n in ("e1", "e2") for p in layer.experts[n].parameters())
