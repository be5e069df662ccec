"""CRAM against references written from the authors' code (LAMDA-CL/EMNLP2026-CRAM: cram_lora.py's
``consolidate_buf_into_expert_slot``, integration.py's RBF routing), the instruction feature, the
groups on the canonical sequence, and the two evaluation routings."""

import pytest
import torch

from mllm_cl.backbones import build_preset
from mllm_cl.data.synth import sample
from mllm_cl.experts import CentroidRouter, ExpertSetup, expert_layers
from mllm_cl.methods import CRAM
from mllm_cl.methods.cram_slots import (
    assign_group,
    instantiate_slot,
    novelty_threshold,
    orthogonality_penalty,
    standardize,
)
from mllm_cl.methods.routing_encoder import RoutingEncoder


# ------------------------------------------------------------- the reference
def ref_rbf_weights(q, centroids, sigma=2.0):
    """Their routing: logits -0.5 ||q - w||^2 / sigma^2 (expanded form), softmax over the group's slots."""
    d2 = (centroids * centroids).sum(1) + (q * q).sum() - 2.0 * (centroids @ q)
    return torch.softmax(-0.5 * d2.clamp_min(0.0) / sigma ** 2, dim=0)


def ref_consolidate(A, B, scale, older_A, *, tau_alloc=0.08, rank_max=9, tau_novel=0.99, rank_min=4):
    """Their slot: kept singular directions and the slot's effective delta (their slot scale 2 applied)."""
    qb, rb = torch.linalg.qr(B)
    us, S, Vh = torch.linalg.svd((scale * rb) @ A, full_matrices=False)
    U = qb @ us
    n = S.numel()
    cand = torch.where(S > tau_alloc)[0]
    if cand.numel() == 0:
        cand = torch.tensor([0])
    cand = cand[torch.argsort(S[cand], descending=True)][: min(rank_max, n, cand.numel())]
    Q = torch.linalg.qr(torch.cat(older_A).T)[0] if older_A else None
    if Q is None:
        sel = cand.tolist()
    else:
        Vc = Vh[cand]
        alpha = (Vc - (Vc @ Q) @ Q.T).norm(dim=1) / Vc.norm(dim=1).clamp(min=1e-12)
        sel = [int(c) for c, a in zip(cand, alpha, strict=False) if a > tau_novel] or [int(cand[0])]
    target = min(max(rank_min, len(sel)), rank_max, n)
    pool = torch.argsort(S, descending=True)[: min(rank_max, n)].tolist()
    sel = sorted(sel, key=lambda k: -float(S[k]))
    sel += [p for p in pool if p not in sel][: max(0, target - len(sel))]
    V = Vh[sel]
    if Q is not None:
        V = V - (V @ Q) @ Q.T
        V = V / V.norm(dim=1, keepdim=True).clamp(min=1e-12)
    sq = S[sel].sqrt()
    return sel, 2.0 * (U[:, sel] * sq) @ (sq[:, None] * V)


def _buffer(d_in=32, d_out=24, seed=0, values=(0.9, 0.6, 0.4, 0.2, 0.1, 0.05, 0.01)):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, len(values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, len(values), generator=g, dtype=torch.float64))
    B = torch.zeros(d_out, 48, dtype=torch.float64)
    A = torch.randn(48, d_in, generator=g, dtype=torch.float64) * 1e-9
    B[:, : len(values)] = u * torch.tensor(values, dtype=torch.float64)
    A[: len(values)] = v.T / 2.0
    return A, B, v


# -------------------------------------------------------------------- tests
def test_rbf_in_the_authors_setting_equals_their_routing():
    router = CentroidRouter(8, embed_dim=6, sigma=2.0)  # bandwidth absolute: every spread 1
    for i in range(3):
        router.add_expert(f"t{i}")
        router.set_centroid(f"t{i}", torch.randn(6) * 3)
    q = torch.randn(5, 6) * 3
    ours = torch.softmax(router.logits(q), -1)
    c = torch.stack([router.centroids[f"t{i}"] for i in range(3)]).detach()
    for b in range(5):
        torch.testing.assert_close(ours[b], ref_rbf_weights(q[b], c), atol=1e-5, rtol=1e-5)


def test_spread_bandwidth_is_scale_free():
    router = CentroidRouter(8, embed_dim=6)
    for i in range(2):
        router.add_expert(f"t{i}")
        router.set_centroid(f"t{i}", torch.full((6,), float(i)))
        router.set_spread(f"t{i}", 0.5)
    q = torch.randn(4, 6)
    before = torch.softmax(router.logits(q), -1)
    for i in range(2):  # every feature 10x: centroids 10x, spreads 100x
        router.set_centroid(f"t{i}", torch.full((6,), 10.0 * i))
        router.set_spread(f"t{i}", 50.0)
    torch.testing.assert_close(torch.softmax(router.logits(10 * q), -1), before)


@pytest.mark.parametrize("older", [0, 1])
def test_slot_in_the_authors_setting_equals_their_consolidation(older):
    A, B, v = _buffer()
    old = [v[:, 1:3].T.clone()
           + 0.05 * torch.randn(2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
           ] if older else []
    sel, ref_delta = ref_consolidate(A, B, 2.0, old)
    A_e, B_e = instantiate_slot(A, B, 2.0, old, threshold="absolute", absolute=0.08, novelty=0.99, r_min=4, r_max=9,
                                slot_scale="authors")
    assert A_e.shape[0] == len(sel)
    ours = 2.0 * B_e @ A_e
    if not older:  # no projection: the same matrix
        torch.testing.assert_close(ours, ref_delta, atol=1e-10, rtol=1e-8)
    # the slot reads the same input directions (their rows are normalized, ours orthonormalized)
    proj = lambda M: M.T @ torch.linalg.pinv(M.T)  # noqa: E731  projector on the row space of M
    ref_rows = torch.linalg.svd(ref_delta, full_matrices=False)[2][: len(sel)]
    torch.testing.assert_close(proj(A_e), proj(ref_rows), atol=1e-8, rtol=1e-6)
    exact_A, exact_B = instantiate_slot(A, B, 2.0, old, threshold="absolute", absolute=0.08, r_min=4, r_max=9)
    torch.testing.assert_close(2.0 * exact_B @ exact_A, ours / 2.0)  # ours starts at the buffer's delta, theirs at 2x


def test_dimension_scaled_novelty_keeps_random_directions_at_small_width():
    assert novelty_threshold(0.99, 4096, 4096) == pytest.approx(0.99)
    assert novelty_threshold(0.99, 128, 4096) == pytest.approx((1 - 0.0199 * 32) ** 0.5)
    assert novelty_threshold(0.99, 128, None) == 0.99
    g = torch.Generator().manual_seed(0)
    old = [torch.linalg.qr(torch.randn(128, 9, generator=g, dtype=torch.float64))[0].T]  # a 9-dim old subspace
    A = torch.randn(48, 128, generator=g, dtype=torch.float64)
    B = torch.randn(64, 48, generator=g, dtype=torch.float64)
    strict = instantiate_slot(A, B, 2.0, old, r_min=1, r_max=9, novelty=0.99)[0].shape[0]
    scaled = instantiate_slot(A, B, 2.0, old, r_min=1, r_max=9, novelty=novelty_threshold(0.99, 128, 4096))[0].shape[0]
    assert strict < scaled == 9  # at d = 128 a random direction keeps ~7% in 9 old dimensions: alpha ~0.96 < 0.99


def test_penalty_authors_basis_uses_the_input_rows_for_square_modules():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 16, generator=g)
    A, B = torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g)
    old_A, old_B = torch.randn(3, 16, generator=g), torch.randn(16, 3, generator=g)
    gamma = torch.rand(5, generator=g)
    z = 2.0 * (h @ A.T) @ B.T
    for basis_of, space in (("output", old_B), ("authors", old_A.T)):
        q = torch.linalg.qr(space.double())[0].float()
        expected = (gamma * (z @ q).square().sum(-1)).mean()
        got = orthogonality_penalty(h, A, B, 2.0, [(old_A, old_B)], gamma, basis_of=basis_of)
        torch.testing.assert_close(got, expected.to(got.dtype), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def base():
    from mllm_cl.backbones.presets import build_backbone

    return build_backbone("tiny-base")


def test_instruction_feature_ignores_the_chat_template(base):
    """Two prompts that differ only in the template give one feature; two questions two."""
    from mllm_cl.data.collate import Collator
    from mllm_cl.data.datasets import conversation_item
    from mllm_cl.data.encoding import ConversationEncoder
    from mllm_cl.data.formats import Conversation
    from mllm_cl.data.images import ImageProcessor

    enc = RoutingEncoder().bind(base.model, base.tokenizer)
    images = ImageProcessor.for_model(base.model)
    items = []
    for template, question in (("vicuna_v1", "What color is the star?"), ("short", "What color is the star?"),
                               ("short", "How many circles are there?")):
        encoder = ConversationEncoder(base.tokenizer, num_image_tokens=base.model.num_image_tokens, template=template)
        conv = Conversation("c", None, [("user", f"<image>\n{question}"), ("assistant", "red")])
        items.append({**conversation_item(conv, encoder, images, 0), "index": 0})
    assert items[0]["input_ids"] != items[1]["input_ids"]  # the templates do differ
    batch = Collator(pad_token_id=0, image_token_id=base.model.image_token_id)(items)
    feats = enc(batch)
    assert torch.equal(feats.text[0], feats.text[1])
    assert not torch.allclose(feats.text[0], feats.text[2])


def test_canonical_instructions_form_more_than_one_group(base):
    enc = RoutingEncoder().bind(base.model, base.tokenizer)
    prototypes = []
    groups = []
    for task in ("color", "classify", "count", "ocr"):
        texts = [sample(task, "train", i).instruction for i in range(32)]
        feats = enc({"input_ids": torch.zeros(32, 2, dtype=torch.long), "has_image": torch.zeros(32, dtype=torch.bool),
                     "instruction": texts, "pixel_values": None})
        mean = standardize(feats.text).mean(0)
        g = assign_group(prototypes, mean)
        if g is None:
            prototypes.append(mean)
            g = len(prototypes) - 1
        groups.append(g)
    assert len(set(groups)) > 1, groups


def _cram(**kwargs):
    backbone = build_preset("tiny-clip-llama", seed=0)
    method = CRAM(ExpertSetup(["q_proj"], rank=8), r_min=2, r_max=3, **kwargs)
    method.tokenizer = backbone.tokenizer
    method.build(backbone.model)
    model = backbone.model
    g = torch.Generator().manual_seed(0)
    size = model.image_size
    batch = {"input_ids": torch.zeros(9, 3, dtype=torch.long), "has_image": torch.ones(9, dtype=torch.bool),
             "instruction": ["What colour is it?"] * 9, "task_ids": torch.zeros(9, dtype=torch.long),
             "pixel_values": torch.randn(9, 3, size, size, generator=g)}
    for task in (0, 1):  # two slots in one group (one instruction): the weights matter
        method.on_task_start(model, task)
        warmup = method.phases(task, 2)[0]
        method.on_phase_start(model, task, warmup)
        method.routing_context({**batch, "task_ids": torch.full((9,), task),
                                "pixel_values": torch.randn(9, 3, size, size, generator=g) + task}, training=True)
        with torch.no_grad():
            for layer in expert_layers(model).values():
                layer.experts["buffer"].B.normal_(generator=g)
        method.on_phase_end(model, task, warmup)
        method.on_task_end(model, task)
    assert method.slots[1]["group"] == 0
    return method, model, batch


def _weights(method, model, batch, rows):
    sub = {k: (v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows] if isinstance(v, list) else v)
           for k, v in batch.items()}
    ctx = method.routing_context(sub, training=False)
    router = next(iter(expert_layers(model).values())).routers["group0"]
    return torch.softmax(router.logits(ctx.image_embeds), -1)


def test_sample_routing_does_not_depend_on_the_batch():
    method, model, batch = _cram()
    whole = _weights(method, model, batch, list(range(9)))
    for i in range(9):
        torch.testing.assert_close(_weights(method, model, batch, [i])[0], whole[i])
    assert not torch.allclose(whole[0], whole[1])


def test_batch_routing_gives_the_batch_one_weight_vector():
    method, model, batch = _cram(eval_routing="batch")
    whole = _weights(method, model, batch, list(range(9)))
    assert torch.allclose(whole, whole[:1].expand_as(whole))
    assert not torch.allclose(_weights(method, model, batch, [0])[0], whole[0])  # it depends on the neighbours


def test_options_are_checked():
    for key, value in (("bandwidth", "wide"), ("eval_routing", "task"), ("novelty_scaling", "log"),
                       ("group_decision", "never"), ("penalty_basis", "input"), ("slot_scale", "3x")):
        with pytest.raises(ValueError, match=f"cram: {key} must be one of"):
            CRAM(ExpertSetup(["q_proj"]), **{key: value})
