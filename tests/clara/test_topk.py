import torch

from clara.data.records import Example
from clara.losses import e2e_loss
from clara.topk import differentiable_topk, select


def test_forward_is_exactly_the_hard_topk():
    torch.manual_seed(0)
    scores = torch.randn(5, 20)
    sel, idx = differentiable_topk(scores, 4, temperature=0.02)
    assert sel.shape == (5, 4, 20)
    assert torch.equal(idx, scores.topk(4, dim=-1).indices)
    expected = torch.nn.functional.one_hot(idx, 20).float()
    assert torch.equal(sel, expected)  # values exactly one-hot, not approximately
    cands = torch.randn(5, 20, 3, 7)
    assert torch.equal(select(sel, cands), cands[torch.arange(5)[:, None], idx])
    shared = torch.randn(20, 3, 7)
    assert torch.equal(select(sel, shared, shared=True), shared[idx])


def test_backward_reaches_the_scores():
    scores = torch.randn(2, 10, requires_grad=True)
    sel, _ = differentiable_topk(scores, 3, temperature=0.5)
    values = torch.randn(10)
    (sel @ values).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_generator_loss_trains_query_reasoner_not_compressor(make_model, scp_records):
    model = make_model()
    # LoRA B matrices start at zero; give every adapter weight a value so gradients are generic.
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.02)
    model.set_trainable(["query_reasoner", "generator"])
    chunks = list(dict.fromkeys(ex.chunks[0] for ex in scp_records[:80]))[:8]
    examples = [Example(tuple(chunks), ex.question, ex.answer, (chunks.index(ex.chunks[0]),), "e2e")
                for ex in scp_records[:80] if ex.chunks[0] in chunks][:4]
    out = e2e_loss(model, examples, k=2)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.peft.named_parameters() if "lora_" in n}
    qr = [g for n, g in grads.items() if ".query_reasoner." in n]
    comp = [g for n, g in grads.items() if ".compressor." in n]
    assert qr and all(g is not None for g in qr) and sum(float(g.abs().sum()) for g in qr) > 0
    assert all(g is None for g in comp)  # frozen compressor: no gradient at all
    assert 0.0 <= out.metrics["recall@2"] <= 1.0
