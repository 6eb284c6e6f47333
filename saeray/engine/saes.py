"""Load SAEs through sae-lens and turn their dense codes into sparse rows on the device.

Every inference architecture sae-lens registers (standard, topk, jumprelu, gated,
abstopk, ...) is encoded with the SAE's own `encode`, so its normalisation and
activation function are the ones it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import SAEConfig

log = logging.getLogger(__name__)

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"


class SAEError(ValueError):
    """An SAE cannot be found, loaded, or does not fit the model."""


class PrecisionError(SAEError):
    """A worker would encode at another precision than the run's committed units."""


@dataclass(frozen=True)
class SAEInfo:
    """What the driver needs to know about an SAE before any weights are loaded."""

    name: str
    hook: str
    d_in: int
    d_sae: int
    architecture: str
    prepend_bos: bool | None
    context_size: int | None
    neuronpedia_id: str | None
    digest: str
    """Hash of the SAE's config and weights (disk SAEs) or of its release and id."""


SHIPPED = "shipped:"
"""`path: shipped:NAME` names an SAE that comes with saeray (in saeray/assets/saes/)."""
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "saes"


def shipped_names() -> list[str]:
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / SAE_CFG_FILENAME).is_file())


def disk_path(cfg: SAEConfig) -> Path:
    """The directory of a disk SAE: `path` as given, or a shipped SAE's folder for `shipped:NAME`."""
    assert cfg.path
    if cfg.path.startswith(SHIPPED):
        name = cfg.path[len(SHIPPED):]
        if name not in shipped_names():
            raise SAEError(f"SAE {cfg.name!r}: no shipped SAE {name!r}; saeray ships "
                           f"{', '.join(SHIPPED + n for n in shipped_names())}")
        return SHIPPED_DIR / name
    return Path(cfg.path).expanduser()


def _check_disk(path: Path, name: str) -> None:
    if not path.exists():
        hint = f" For the SAE shipped with saeray, write `path: {SHIPPED}{path.name}`." \
            if path.name in shipped_names() else ""
        raise SAEError(f"SAE {name!r}: {path} does not exist (a relative path is read from the config file's folder, "
                       f"then from the current directory {os.getcwd()}).{hint}")
    if not (path / SAE_CFG_FILENAME).is_file():
        raise SAEError(f"SAE {name!r}: {path} is not a sae-lens SAE directory (no {SAE_CFG_FILENAME}). "
                       "Give a directory written by SAE.save_model, or a `release` and `id`")
    if not (path / SAE_WEIGHTS_FILENAME).is_file():
        raise SAEError(f"SAE {name!r}: {path} has no {SAE_WEIGHTS_FILENAME} (only safetensors weights are loaded)")


def _check_weights(file: Path, name: str) -> None:
    """Refuse a safetensors file whose header is unreadable or that is shorter than its header says (a copy or
    download cut short), from its header alone."""
    size = file.stat().st_size
    fix = "copy or download it again"
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise SAEError(f"SAE {name!r}: {file} is truncated or not a safetensors file ({size:,} bytes): {fix}")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise SAEError(f"SAE {name!r}: {file} has an unreadable safetensors header ({e}): {fix}") from None
    if 8 + n + end > size:
        raise SAEError(f"SAE {name!r}: {file} is truncated ({size:,} bytes; its header describes {8 + n + end:,}): "
                       f"{fix}")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_config(cfg: SAEConfig) -> dict[str, Any]:
    """The SAE's sae-lens config dict, without loading its weights."""
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting, load_sae_config_from_huggingface

    if cfg.path:
        path = disk_path(cfg)
        _check_disk(path, cfg.name)
        try:
            raw = json.loads((path / SAE_CFG_FILENAME).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise SAEError(f"SAE {cfg.name!r}: {path / SAE_CFG_FILENAME} is not valid JSON ({e}): replace it with the "
                           "cfg.json the SAE was saved with") from None
        _check_weights(path / SAE_WEIGHTS_FILENAME, cfg.name)
        return handle_config_defaulting(raw)
    try:
        return load_sae_config_from_huggingface(cfg.release, cfg.id)
    except Exception as e:  # sae-lens raises ValueError/KeyError/HTTP errors alike
        raise SAEError(f"SAE {cfg.name!r}: cannot read config of release {cfg.release!r} id {cfg.id!r}: {e}") from None


def describe(cfg: SAEConfig) -> SAEInfo:
    raw = read_config(cfg)
    meta = raw.get("metadata") or {}
    hook = cfg.hook or meta.get("hook_name") or raw.get("hook_name")
    if not hook:
        raise SAEError(f"SAE {cfg.name!r} does not say which hook it reads: set `hook:` in its config entry")
    if cfg.path:
        path = disk_path(cfg)
        digest = hashlib.sha256(((path / SAE_CFG_FILENAME).read_bytes()) +
                                _file_digest(path / SAE_WEIGHTS_FILENAME).encode()).hexdigest()
    else:
        digest = hashlib.sha256(f"{cfg.release}\0{cfg.id}".encode()).hexdigest()
    return SAEInfo(
        name=cfg.name, hook=hook, d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]),
        architecture=str(raw.get("architecture", "standard")),
        prepend_bos=meta.get("prepend_bos", raw.get("prepend_bos")),
        context_size=meta.get("context_size", raw.get("context_size")),
        neuronpedia_id=meta.get("neuronpedia_id", raw.get("neuronpedia_id")),
        digest=digest,
    )


def resolve_dtype(name: str, device: torch.device) -> str:
    """The encode precision a worker on `device` uses for saes[].dtype `name`: `auto` is tf32 on a GPU (float32
    weights, the encoder's matrix products on TF32 tensor cores: bench/sae_precision.py measures its agreement
    with float32 against bfloat16's) and float32 on a CPU; tf32 is float32 on a CPU, which has no TF32."""
    if name == "auto":
        name = "tf32"
    if name == "tf32" and device.type != "cuda":
        return "float32"
    return name


def torch_dtype_of(resolved: str) -> str:
    """The weights' dtype of a resolved encode precision (tf32: float32 weights)."""
    return "float32" if resolved == "tf32" else resolved


TF32_ATTR = "saeray_tf32"
"""Set on a loaded SAE whose encodes run their matrix products on TF32 tensor cores (`load`)."""


@contextmanager
def tf32_matmuls(on: bool) -> Iterator[None]:
    """CUDA float32 matrix products on TF32 tensor cores meanwhile (cuBLAS reads the setting at each launch)."""
    if not on:
        yield
        return
    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was


def encode_chunk_tokens(d_sae: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows of the dense code encoded at once. Each chunk costs one host sync (`nonzero`'s output size is data
    dependent), so a GPU encodes up to 2 GiB of code at once (16k latents in bf16: 65,536 tokens, a whole
    batch; 131k latents: 8,192); CPU keeps 4,096 rows, which stay in cache."""
    if device.type != "cuda":
        return 4096
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return max(4096, (2 << 30) // (d_sae * itemsize))


def load(cfg: SAEConfig, device: torch.device) -> Any:
    """Load an SAE with sae-lens onto `device` (dtype `auto` resolved for it), in eval mode without gradients."""
    from sae_lens import SAE

    resolved = resolve_dtype(cfg.dtype, device)
    dtype = torch_dtype_of(resolved)
    if cfg.path:
        path = disk_path(cfg)
        _check_disk(path, cfg.name)
        try:
            sae = SAE.load_from_disk(path, device=str(device), dtype=dtype)
        except Exception as e:  # noqa: BLE001 - safetensors, torch and sae-lens each raise their own on a damaged file
            raise SAEError(f"SAE {cfg.name!r}: cannot load {path} ({type(e).__name__}: {e}): copy or download it "
                           "again") from None
    else:
        sae = SAE.from_pretrained(cfg.release, cfg.id, device=str(device), dtype=dtype)
    sae.eval()
    sae.requires_grad_(False)
    setattr(sae, TF32_ATTR, resolved == "tf32")
    return sae


def decoder(cfg: SAEConfig) -> torch.Tensor:
    """The SAE's W_dec [d_sae, d_in] as float32 on the CPU. A disk SAE's is read from its weights file alone, as
    sae-lens's disk loader reads it (unchanged; importing sae-lens alone takes over a second); one without a 2-D
    W_dec there, or from the hub, is loaded with sae-lens."""
    if cfg.path:
        from safetensors import safe_open

        path = disk_path(cfg)
        _check_disk(path, cfg.name)
        try:
            with safe_open(str(path / SAE_WEIGHTS_FILENAME), framework="pt") as f:
                if "W_dec" in f.keys() and len(f.get_slice("W_dec").get_shape()) == 2:
                    return f.get_tensor("W_dec").float()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own on a damaged file
            raise SAEError(f"SAE {cfg.name!r}: cannot read {path / SAE_WEIGHTS_FILENAME} ({type(e).__name__}: {e}): "
                           "copy or download it again") from None
    return load(cfg, torch.device("cpu")).W_dec.detach().float()


class ReconStats:
    """Mergeable reconstruction partials for one (SAE, group): error, input moments, L0, MSE histogram."""

    BINS = torch.logspace(-8, 8, 65, dtype=torch.float64)
    """Edges of the per-token squared-error histogram (log-spaced; under/overflow go to the end bins)."""

    def __init__(self, d_in: int, device: torch.device):
        self.n = 0
        z = dict(device=device)
        self._sse = torch.zeros((), dtype=torch.float64, **z)  # on the device: no host sync per chunk
        self._sum_sq = torch.zeros((), dtype=torch.float64, **z)
        self._l0 = torch.zeros((), dtype=torch.int64, **z)
        self.sum_x = torch.zeros(d_in, dtype=torch.float64, **z)
        self.hist = torch.zeros(len(self.BINS) - 1, dtype=torch.int64, **z)
        self._edges = self.BINS.to(device)

    @property
    def sse(self) -> float:
        return float(self._sse)

    @property
    def sum_sq(self) -> float:
        return float(self._sum_sq)

    @property
    def l0(self) -> int:
        return int(self._l0)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor) -> None:
        xd = x.double()
        err = ((x_hat.double() - xd) ** 2).sum(-1)
        self.n += len(x)
        self._sse += err.sum()
        self._sum_sq += (xd * xd).sum()
        self.sum_x += xd.sum(0)
        self._l0 += (acts != 0).sum()
        idx = (torch.bucketize(err, self._edges) - 1).clamp(0, len(self.hist) - 1)
        if idx.device.type == "cpu":
            self.hist += torch.bincount(idx, minlength=len(self.hist))
        else:  # CUDA's bincount reads the input's range back to the host
            self.hist.scatter_add_(0, idx, torch.ones_like(idx))


@dataclass
class DenseCodes:
    """A queued encode of `n` rows: per chunk (first row, code, active mask), and the chunks' active counts,
    copied to the host without blocking; `ready` (CUDA) is recorded right after that copy, so waiting on it
    waits for this encode alone, not for the batches queued after it."""

    chunks: list[tuple[int, torch.Tensor, torch.Tensor]]
    counts: torch.Tensor
    ready: Any = None


def _encoded_chunks(sae: Any, x: torch.Tensor, threshold: float, chunk_tokens: int, recon: ReconStats | None
                    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(first row, code, active mask) of `x`'s chunks of `chunk_tokens` rows, encoded one at a time as they are
    asked for (reconstruction stats folded into `recon`)."""
    tf32 = getattr(sae, TF32_ATTR, False) and x.is_cuda
    for start in range(0, x.shape[0], chunk_tokens):
        xc = x[start:start + chunk_tokens].to(sae.dtype)
        with tf32_matmuls(tf32):
            acts = sae.encode(xc)
            if recon is not None:
                recon.add(xc, sae.decode(acts), acts)
        yield start, acts, (acts.abs() > threshold if threshold > 0 else acts != 0)
        del acts  # before the next chunk is encoded


def _entries(start: int, acts: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, feature, value) of one chunk's active entries at `idx` ([nnz, 2] positions in the chunk)."""
    return idx[:, 0] + start, idx[:, 1], acts[idx[:, 0], idx[:, 1]].float()


def _concat(parts: list[tuple[torch.Tensor, ...]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not parts:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty, torch.empty(0, dtype=torch.float32, device=device)
    rows, feats, vals = (torch.cat(p) for p in zip(*parts))
    return rows, feats, vals


@torch.inference_mode()
def encode_dense(sae: Any, x: torch.Tensor, threshold: float, chunk_tokens: int, recon: ReconStats | None = None
                 ) -> DenseCodes:
    """Queue the encoding of `x` [n, d_in], `chunk_tokens` rows at a time, with no host sync (and
    reconstruction stats folded into `recon`). `active_entries` reads it."""
    chunks = list(_encoded_chunks(sae, x, threshold, chunk_tokens, recon))
    sizes = [mask.sum() for _, _, mask in chunks]
    stacked = torch.stack(sizes) if sizes else torch.zeros(0, dtype=torch.int64, device=x.device)
    if x.device.type != "cuda":
        return DenseCodes(chunks, stacked)
    host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
    host.copy_(stacked, non_blocking=True)
    ready = torch.cuda.Event(blocking=True)  # the host sleeps on it (a non-blocking event's wait spins a core)
    ready.record()
    return DenseCodes(chunks, host, ready)


def nonzero_sized(mask: torch.Tensor, size: int) -> torch.Tensor:
    """`mask.nonzero()` when its count `size` is known on the host: no sync on a GPU (torch.nonzero_static, whose
    CUDA kernel came with torch 2.6). An empty mask gets an empty result without a kernel (nonzero_static's
    CUDA kernel failed on empty input before torch 2.9)."""
    if mask.numel() == 0:
        return torch.zeros((0, mask.dim()), dtype=torch.int64, device=mask.device)
    return torch.nonzero_static(mask, size=size)


def active_entries(codes: DenseCodes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row [nnz] int64, feature [nnz] int64, value [nnz] float32) of queued codes' active entries, sorted by
    (row, feature), on their device. Waits for that encode only (its count), then gathers with sizes known
    on the host (`nonzero_static`): no further sync."""
    if codes.ready is not None:
        codes.ready.synchronize()
    sizes = codes.counts.tolist()
    device = codes.chunks[0][1].device if codes.chunks else torch.device("cpu")
    parts = []
    while codes.chunks:
        start, acts, mask = codes.chunks.pop(0)  # each chunk's code is freed once read
        parts.append(_entries(start, acts, nonzero_sized(mask, int(sizes.pop(0)))))
        del acts, mask
    return _concat(parts, device)


def _sparse_chunks(sae: Any, x: torch.Tensor, threshold: float, chunk_tokens: int, recon: ReconStats | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode and read one chunk at a time (one chunk's code in memory; a sync per chunk)."""
    parts = []
    for start, acts, mask in _encoded_chunks(sae, x, threshold, chunk_tokens, recon):
        parts.append(_entries(start, acts, mask.nonzero()))
        del acts, mask
    return _concat(parts, x.device)


@torch.inference_mode()
def encode_sparse(sae: Any, x: torch.Tensor, threshold: float, chunk_tokens: int, recon: ReconStats | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode `x` [n, d_in] and keep the active entries, one chunk's dense code in memory at a time.

    Returns (row [nnz] int64, feature [nnz] int64, value [nnz] float32), all on x's device, sorted by
    (row, feature). (`encode_dense` + `active_entries` queue every chunk first, for batches in flight.)"""
    return _sparse_chunks(sae, x, threshold, chunk_tokens, recon)
