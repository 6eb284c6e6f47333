"""Device-path pieces a CPU can check: sized nonzero, the in-flight depth's memory accounting."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saeray.assets.tiny import make_sae
from saeray.engine import saes
from saeray.engine.config import SAEConfig
from saeray.engine.extract import SAEHandle, in_flight
from saeray.engine.models import HookSite
from saeray.engine.resources import free_device_bytes


@pytest.mark.parametrize("shape,density", [((7, 33), 0.2), ((5, 9), 0.0), ((0, 16), 0.5), ((4, 4), 1.0)])
def test_nonzero_sized_equals_nonzero(shape, density):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=g) < density
    want = mask.nonzero()
    got = saes.nonzero_sized(mask, int(mask.sum()))
    assert torch.equal(got, want)


def _fake_report(free: int, reserved: int, allocated: int):
    """A stand-in for a GPU's memory report (torch.cuda's needs a GPU): (driver free, reserved, allocated)."""
    return lambda device: (free, reserved, allocated)


def test_free_bytes_count_reserved_but_unallocated():
    mb = 1 << 20
    assert free_device_bytes(torch.device("cuda"), _fake_report(1 * mb, 6 * mb, 1 * mb)) == 6 * mb
    assert free_device_bytes(torch.device("cuda"), _fake_report(3 * mb, 2 * mb, 2 * mb)) == 3 * mb


def test_in_flight_depth_survives_cached_blocks(tmp_path):
    """After a unit, its dense codes' blocks stay in PyTorch's cache: the driver reports them as used. The depth
    counts them as free, so a later sizing gives what the first did (it fell to 0 when only the driver's free
    memory counted)."""
    sae = saes.load(SAEConfig(name="s", path=str(make_sae(tmp_path / "sae", "standard", 64, "blocks.1.hook_resid_pre"))),
                    torch.device("cpu"))
    handles = [SAEHandle("s", sae, HookSite("blocks.1.hook_resid_pre", 1, "hook_resid_pre"), 0.0)]
    per_batch = 1000 * 96 * (4 + 1)  # tokens x d_sae x (float32 code + mask byte)
    cuda = torch.device("cuda")  # only its type is read: nothing runs on a GPU here
    mb = 1 << 20
    fresh = _fake_report(free=6 * mb, reserved=0, allocated=0)
    after_unit = _fake_report(free=1 * mb, reserved=5 * mb, allocated=0)  # the unit's blocks cached, none in use
    assert 3 * per_batch <= 0.25 * 6 * mb
    assert in_flight(1000, handles, cuda, report=fresh) == 2
    assert in_flight(1000, handles, cuda, report=after_unit) == 2
    busy = _fake_report(free=1 * mb, reserved=5 * mb, allocated=5 * mb)  # cached blocks that tensors do hold
    assert in_flight(1000, handles, cuda, report=busy) == 0
    assert in_flight(1000, handles, torch.device("cpu")) == 0


@pytest.mark.parametrize("n,size", [(1000, 37), (0, 5), (3, 1), (500, 4000)])
def test_segment_sum_equals_index_add(n, size):
    """The GPU's deterministic sum (sort + segment_reduce) against index_add_, both run here on CPU."""
    from saeray.engine.feature_stats import segment_sum

    g = torch.Generator().manual_seed(n + size)
    index = torch.randint(0, size, (n,), generator=g)
    values = torch.rand(n, generator=g, dtype=torch.float64) * 10
    want = torch.zeros(size, dtype=torch.float64).index_add_(0, index, values)
    got = segment_sum(index, values, size, deterministic=True)
    assert got.dtype == torch.float64 and got.shape == (size,)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    assert torch.equal(segment_sum(index, values, size), want)  # CPU default: index_add_ itself


def test_auto_attention_choice():
    """auto: flex_attention on a GPU for soft-capped Gemma 2, transformers' choice otherwise (the device is only read
    for its type); the config accepts flex_attention."""
    from transformers import Gemma2Config, LlamaConfig

    from saeray.engine import config
    from saeray.engine.models import auto_attention

    capped = Gemma2Config(num_hidden_layers=2, attn_logit_softcapping=50.0)
    assert auto_attention(capped, torch.device("cuda")) == "flex_attention"
    assert auto_attention(capped, torch.device("cpu")) is None
    assert auto_attention(LlamaConfig(num_hidden_layers=2), torch.device("cuda")) is None
    built = config._build(config.ModelConfig, {"name": "x", "attn_implementation": "flex_attention", "compile": True}, "model")
    assert built.attn_implementation == "flex_attention" and built.compile is True
    with pytest.raises(config.ConfigError):
        config._build(config.ModelConfig, {"name": "x", "compile": "yes"}, "model")


def _extractor(tiny, **kw):
    """The tiny Llama and standard SAE in an Extractor with examples (top 2, 1 per bin), contexts and last values;
    (extractor, documents)."""
    from saeray.engine import models
    from saeray.engine.config import ModelConfig, PositionsConfig
    from saeray.engine.contexts import Tokenization
    from saeray.engine.extract import Extractor

    cpu = torch.device("cpu")
    model, tok = models.load_model(ModelConfig(name=str(tiny["llama"]), dtype="float32"), cpu)
    sae_cfg = SAEConfig(name="s", path=str(tiny["sae_standard"]))
    handle = SAEHandle("s", saes.load(sae_cfg, cpu), models.parse_hook(saes.describe(sae_cfg).hook, 4), 0.0)
    t = Tokenization(tok, PositionsConfig(), prepend_bos=True, context_size=24, exclude_special=True)
    docs = t.text_documents([(i, text, {}) for i, text in enumerate(tiny["docs"])])
    ext = Extractor(model, [handle], t, batch_tokens=64, device=cpu, top_k=2, per_bin=1, radius=2, last_values=True,
                    **kw)
    return ext, docs


class DataSizedOps(TorchDispatchMode):
    """Counts the operations a GPU cannot run without the host waiting for the device: outputs sized by the data
    (nonzero, unique, masked_select, indexing or assigning through a boolean mask), values read as Python numbers
    (`item`, `int(t)`), and bincount (CUDA's reads its input's range back). `nonzero_static` with a size the host
    knows is none of these."""

    SIZED = {"aten::nonzero", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::masked_select",
             "aten::_local_scalar_dense", "aten::bincount"}
    INDEXED = {"aten::index", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.SIZED or (name == "aten::repeat_interleave" and "output_size" not in (kwargs or {})):
            self.n += 1
        elif name in self.INDEXED and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_host_syncs_per_batch_and_block(tiny, monkeypatch):
    """What a GPU waits for, counted on CPU tensors with the GPU's variants of each operation (partials.on_host
    off): with batches in flight, none per batch beyond the wait for its counts (read from pinned memory behind
    the batch's event, which no CPU op shows), and per block and (SAE, group) at most nine, as docs/performance.md
    says: the block's (document, feature) pairs; for the top lists and for the binned samples each, the
    candidates, the entries kept in the groups they touch, and those that stay (none of these three when nothing
    is a candidate); the contexts near kept maxima; the last values' positions."""
    from saeray.engine import partials
    from saeray.engine.batching import blocks
    from saeray.engine.extract import Extractor

    monkeypatch.setattr(partials, "on_host", lambda t: False)
    ext, docs = _extractor(tiny, ahead=2)
    per_batch, per_block = [], []

    def counted(method, into):
        def run(self, *args):
            with DataSizedOps() as ops:
                out = method(self, *args)
            into.append(ops.n)
            return out
        return run

    monkeypatch.setattr(Extractor, "_finish", counted(Extractor._finish, per_batch))
    monkeypatch.setattr(Extractor, "_collect", counted(Extractor._collect, per_block))
    for keep_rows, block in zip([True, False] * 100, blocks(docs, 200)):
        ext.push(block, keep_rows)
    ext.drain()
    assert len(per_block) > 3 and len(per_batch) > len(per_block)
    assert set(per_batch) == {0}
    assert max(per_block) == 9 and per_block.count(9) > len(per_block) // 2


def test_host_reads_per_block(tiny):
    """A block's bookkeeping reads the device through partials.to_host: per (SAE, group), one transfer each for the
    example contexts, the last values and the rows (each a single copy of all their columns)."""
    import numpy as np

    from saeray.engine.batching import blocks
    from saeray.engine.partials import HOST_READS, packed_to_host, to_host

    ext, docs = _extractor(tiny)
    n_blocks = 0
    for block in blocks(docs, 200):
        before = HOST_READS["transfers"]
        ext.process(block, True)
        assert HOST_READS["transfers"] - before == 3
        n_blocks += 1
    assert n_blocks > 3
    # the packed transfer gives back each tensor's values and dtype
    cols = [torch.tensor([3, -1]), torch.tensor([1.5, -0.25]), torch.tensor([7], dtype=torch.int32)]
    assert to_host() == []
    for got, want in zip(packed_to_host(tuple(cols)), cols):  # the GPU's packing, run here on CPU tensors
        assert got.dtype == want.numpy().dtype and np.array_equal(got, want.numpy())
