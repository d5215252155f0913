"""He et al. (2019)'s synthetic text: a dataset whose generator, and so whose answer, is known.

The generator (``synthetic-data/lm_lstm.py`` of jxhe/vae-lagging-encoder, last at 6c014aa) is a
randomly initialised, never trained LSTM language model conditioned on a latent z:

* z ~ uniform mixture of four N(mean_k, I), means (-2,-2), (2,2), (-2,2), (2,-2);
* c0 = W_t z, h0 = tanh(c0); the LSTM reads [embedding of the previous word ; z];
* next word ~ softmax(W1 h_t + W2 z); the first word is uniform over the vocabulary;
* every parameter ~ U(-1, 1) (LSTM biases included), except W2 ~ U(-5, 5), which makes z
  strongly visible in the words; vocabulary 1,000, embedding 100, 100 hidden units, 10 words.

Sampling here is ours (float64, inverse-CDF draws from one seeded ``torch.Generator``), so a seed
gives the same bytes on any machine, but not the bytes of the authors' file.  Because the
generator is known, -log p(x) is computable: :func:`exact_nll` integrates p(x|z) p(z) over z on a
lattice.  The data (words ``w0`` .. ``w999``, one sentence per line), the true z and mixture
component of every sentence, and the true NLL of the validation and test sentences are written
once to a cache folder and read back, checksums verified, by every later run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..config import SYNTHETIC_LENGTH, SYNTHETIC_SEED
from ..errors import CvaeError

# Their config reads a train and a test file (and validates on the test file); the sizes of the
# two are not published. We keep their 20,000 sentences and hold out 1,000 each for valid and test:
# the true NLL costs 0.1-0.3 s of one CPU core per sentence, and 1,000 give its mean to ~0.25 nats.
SPLIT_SIZES = {"train": 18_000, "valid": 1_000, "test": 1_000}
FORMAT = 1  # bump when the generator, the sampling order or the files change
SAMPLE_CHUNK = 1_000  # sentences drawn per batch; part of the random stream's definition


@dataclass(frozen=True)
class GeneratorShape:
    vocab: int = 1000
    embed: int = 100
    hidden: int = 100
    length: int = SYNTHETIC_LENGTH
    means: tuple[tuple[float, ...], ...] = ((-2.0, -2.0), (2.0, 2.0), (-2.0, 2.0), (2.0, -2.0))
    w2_scale: float = 5.0

    @property
    def latent_dim(self) -> int:
        return len(self.means[0])


class SyntheticLM:
    """The generator: parameters drawn from ``seed`` (float64, CPU).

    ``log_px_given_z(x [M, L], z [M, d]) -> [M]``: log p(x | z) in nats, the uniform first word
    included; ``log_prior(z [..., d]) -> [...]``; ``sample(n, generator)`` -> (x, z, component).
    """

    def __init__(self, seed: int = SYNTHETIC_SEED, shape: GeneratorShape = GeneratorShape()):
        self.shape = shape
        generator = torch.Generator().manual_seed(seed)
        v, e, h, d = shape.vocab, shape.embed, shape.hidden, shape.latent_dim

        def uniform(rows: int, cols: int, scale: float = 1.0) -> Tensor:
            return (torch.rand(rows, cols, generator=generator, dtype=torch.float64) * 2 - 1) * scale

        self.embedding = uniform(v, e)
        self.w_input = uniform(4 * h, e + d)  # LSTM gates i, f, g, o (PyTorch's order)
        self.w_hidden = uniform(4 * h, h)
        self.bias = uniform(1, 4 * h)[0] + uniform(1, 4 * h)[0]  # nn.LSTM's bias_ih + bias_hh
        self.w_t = uniform(h, d)
        self.w1 = uniform(v, h)
        self.w2 = uniform(v, d, shape.w2_scale)
        self.means = torch.tensor(shape.means, dtype=torch.float64)
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[Tensor, ...]] = {}

    def _params(self, like: Tensor) -> tuple[Tensor, ...]:
        """(gates of each word [V, 4H] with the biases, z -> gates [d, 4H], W_hh^T, W_t^T, [W1 W2]^T) in
        the dtype and on the device of ``like``.  The word part of the input projection becomes a table
        (a lookup per step instead of a product) and the output layer reads [h; z] in one product."""
        key = (like.dtype, like.device)
        if key not in self._cast:
            e = self.shape.embed
            word_gates = self.embedding @ self.w_input[:, :e].T + self.bias
            output = torch.cat([self.w1, self.w2], 1).T
            self._cast[key] = tuple(t.to(like).contiguous() for t in (
                word_gates, self.w_input[:, e:].T, self.w_hidden.T, self.w_t.T, output))
        return self._cast[key]

    def _start(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (h0, c0, the z part of every step's gates [M, 4H])."""
        _, z_gates, _, w_t, _ = self._params(z)
        c = z @ w_t
        return torch.tanh(c), c, z @ z_gates

    def _step(self, previous: Tensor, z: Tensor, h: Tensor, c: Tensor, z_gates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One LSTM step on [embedding(previous); z] -> (h, c, logits W1 h + W2 z [M, V])."""
        word_gates, _, w_hidden, _, output = self._params(z)
        i, f, g, o = (word_gates[previous] + z_gates + h @ w_hidden).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c, torch.cat([h, z], -1) @ output

    def log_px_given_z(self, x: Tensor, z: Tensor) -> Tensor:
        """x [M, L] word ids, z [M, d] (its dtype is the computation's) -> log p(x | z) [M]."""
        h, c, z_gates = self._start(z)
        total = torch.full((x.shape[0],), -math.log(self.shape.vocab), dtype=z.dtype, device=z.device)
        for t in range(x.shape[1] - 1):
            h, c, logits = self._step(x[:, t], z, h, c, z_gates)
            total += torch.log_softmax(logits, -1).gather(1, x[:, t + 1 : t + 2])[:, 0]
        return total

    def log_prior(self, z: Tensor) -> Tensor:
        means = self.means.to(z)
        d, k = means.shape[1], means.shape[0]
        squared = ((z.unsqueeze(-2) - means) ** 2).sum(-1)  # [..., K]
        return torch.logsumexp(-0.5 * squared, -1) - math.log(k) - 0.5 * d * math.log(2 * math.pi)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """n sentences -> (x [n, L] word ids, z [n, d] float64, component [n])."""
        shape, d = self.shape, self.shape.latent_dim

        def uniform(*size: int) -> Tensor:
            return torch.rand(*size, generator=generator, dtype=torch.float64)

        component = (uniform(n) * len(shape.means)).long().clamp(max=len(shape.means) - 1)
        u1, u2 = uniform(n, d), uniform(n, d)  # Box-Muller: our own normals, the same in every torch
        z = self.means[component] + torch.sqrt(-2 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2)
        words = [(uniform(n) * shape.vocab).long().clamp(max=shape.vocab - 1)]
        h, c, z_gates = self._start(z)
        for _ in range(shape.length - 1):
            h, c, logits = self._step(words[-1], z, h, c, z_gates)
            cdf = torch.softmax(logits, -1).cumsum(-1)
            draw = uniform(n, 1) * cdf[:, -1:]
            words.append(torch.searchsorted(cdf, draw, right=True)[:, 0].clamp(max=shape.vocab - 1))
        return torch.stack(words, 1), z, component


# ---------------------------------------------------------------------------------------------
# The exact likelihood: p(x) = ∫ p(x|z) p(z) dz on a lattice fitted to each sentence's posterior.

QUADRATURE_DTYPE = torch.float32  # log-likelihoods of ~30 nats to ~1e-5: far below the 0.01 asked
STEP = 0.1  # lattice step in z; the true posteriors' narrowest features are ~0.1 wide
THRESHOLD = 12.0  # nodes are added while within this many nats of the best one
TOLERANCE = 0.01  # nats: the largest change of -log p(x) allowed when the lattice step is halved
QUADRATURE_NOTE = (f"-log p(x) by the trapezoid rule on a lattice over z (step {STEP:g}, halved until doubling it "
                   f"changes the result by < {TOLERANCE:g} nats), filled out to {THRESHOLD:g} nats below the peak")
REACH = 8.0  # the lattice spans this far from its anchor in z; a posterior reaching the edge is redone wider


def _evaluate(lm: SyntheticLM, x: Tensor, z: Tensor) -> Tensor:
    """log p(x_i | z_i) + log p(z_i) for rows of x [M, L] and z [M, d]."""
    return lm.log_px_given_z(x, z) + lm.log_prior(z)


def _grid(offsets: Tensor, d: int) -> Tensor:
    """All d-tuples of ``offsets`` -> [n^d, d]."""
    return torch.cartesian_prod(*([offsets] * d)).reshape(-1, d)


def _best_node(lm: SyntheticLM, x: Tensor) -> Tensor:
    """The best z of a grid of step 1 over [-6, 6]^d, then of step 0.25 around it -> [B, d]."""
    b, d = x.shape[0], lm.shape.latent_dim
    best = torch.zeros(b, d, dtype=QUADRATURE_DTYPE, device=x.device)
    for step, reach in ((1.0, 6), (0.25, 4)):  # 13^d, then 9^d nodes per sentence
        offsets = _grid(torch.arange(-reach, reach + 1, dtype=best.dtype, device=x.device) * step, d)
        z = (best.unsqueeze(1) + offsets).reshape(-1, d)
        values = _evaluate(lm, x.repeat_interleave(len(offsets), 0), z).reshape(b, -1)
        best = z.reshape(b, -1, d)[torch.arange(b, device=x.device), values.argmax(1)]
    return best


def _dilate(mask: Tensor) -> Tensor:
    """``mask`` [B, S, ..., S] grown by one node in every direction, diagonals included."""
    for axis in range(1, mask.dim()):
        n = mask.shape[axis]
        grown = mask.clone()
        grown.narrow(axis, 1, n - 1).logical_or_(mask.narrow(axis, 0, n - 1))
        grown.narrow(axis, 0, n - 1).logical_or_(mask.narrow(axis, 1, n - 1))
        mask = grown
    return mask


def _lattice_integral(lm: SyntheticLM, x: Tensor, anchor: Tensor, step: float,
                      reach: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flood-fill the lattice z = anchor + step·k (k ∈ Z^d, |k_i| ≤ reach/step) outwards from the
    anchor: every neighbour of a node within THRESHOLD nats of the best node is added, until none
    is left, so secondary modes joined to the main one are included.
    -> (log p(x) [B] (the trapezoid rule), the same from every other node (twice the step) [B],
    E[z|x] [B, d], overflow [B]: the filled region reached the lattice's edge, extent [B]: how far
    from the anchor it reaches (max norm, in z))."""
    b, d = x.shape[0], lm.shape.latent_dim
    half = round(reach / step)
    size = 2 * half + 1
    values = torch.full((b,) + (size,) * d, -math.inf, dtype=torch.float64, device=x.device)
    done = torch.zeros_like(values, dtype=torch.bool)
    frontier = torch.zeros_like(done)
    frontier[(slice(None),) + (half,) * d] = True
    while frontier.any():
        index = frontier.nonzero()
        z = anchor[index[:, 0]] + (index[:, 1:] - half).to(anchor.dtype) * step
        values[frontier] = _evaluate(lm, x[index[:, 0]], z).double()
        done |= frontier
        best = values.reshape(b, -1).amax(1).reshape((b,) + (1,) * d)
        frontier = _dilate(done & (values >= best - THRESHOLD)) & ~done
    flat = values.reshape(b, -1)
    log_p = torch.logsumexp(flat, 1) + d * math.log(step)
    even = (slice(None),) + (slice(half % 2, None, 2),) * d  # the lattice of twice the step, anchor included
    log_p_coarse = torch.logsumexp(values[even].reshape(b, -1), 1) + d * math.log(2 * step)
    offsets = _grid(torch.arange(-half, half + 1, dtype=torch.float64, device=x.device) * step, d)  # [S^d, d]
    weights = torch.softmax(flat, 1)  # the posterior on the lattice
    posterior_mean = anchor.double() + weights @ offsets
    inner = (slice(None),) + (slice(1, -1),) * d
    edge = done.clone()
    edge[inner] = False
    overflow = edge.reshape(b, -1).any(1)
    extent = (offsets.abs().amax(1) * done.reshape(b, -1)).amax(1)
    return log_p, log_p_coarse, posterior_mean, overflow, extent


@dataclass
class ExactNLL:
    nll: Tensor  # [N] float64: -log p(x), nats per sentence
    check: Tensor  # [N]: |change of -log p(x)| between this lattice and one of twice its step
    posterior_mean: Tensor  # [N, d]: E[z | x] under the true posterior
    step: Tensor  # [N]: the lattice step used


def exact_nll(lm: SyntheticLM, x: Tensor, batch_size: int = 100, tolerance: float = TOLERANCE,
              step: float = STEP, device: torch.device | str = "cpu",
              progress: Callable[[int, int], None] | None = None) -> ExactNLL:
    """-log p(x) of every sentence of x [N, L] (word ids) by quadrature over z.

    Per sentence: the best node of a coarse grid anchors a lattice of ``step`` in z, filled
    outwards while the integrand is within THRESHOLD nats of its maximum (for a Gaussian posterior
    the mass left out is e^-THRESHOLD, far below ``tolerance``).  The trapezoid rule on this smooth, decaying
    integrand converges fast in the step; the sum over every other node (twice the step) must
    agree to ``tolerance`` nats, else the sentence is redone with half the step, at most three
    times.  The last check is returned: a caller can see that it holds.  Results are on the CPU,
    whatever ``device`` computes them.
    """
    n, d = x.shape[0], lm.shape.latent_dim
    x = x.to(device)
    result = ExactNLL(*(torch.empty(n, dtype=torch.float64) for _ in range(2)),
                      torch.empty(n, d, dtype=torch.float64), torch.empty(n, dtype=torch.float64))
    with torch.no_grad():
        for start in range(0, n, batch_size):
            rows = torch.arange(start, min(n, start + batch_size))
            anchor = _best_node(lm, x[rows.to(x.device)])
            todo, this_step, reach = torch.ones(len(rows), dtype=torch.bool), step, REACH
            for _ in range(4):
                where = rows[todo]
                log_p, coarse, mean, overflow, extent = (t.cpu() for t in _lattice_integral(
                    lm, x[where.to(x.device)], anchor[todo.to(x.device)], this_step, reach))
                result.nll[where], result.posterior_mean[where], result.step[where] = -log_p, mean, this_step
                result.check[where] = torch.where(overflow, math.inf, (log_p - coarse).abs())
                redo = result.check[where] > tolerance
                if not redo.any():
                    break
                todo = torch.isin(rows, where[redo])
                if overflow[redo].any():
                    reach *= 2  # the posterior reaches further than the lattice: wider, same step
                else:  # half the step over the region found (a finer lattice moves its edge by < a step)
                    this_step, reach = this_step / 2, extent[redo].max().item() + 0.5
            if progress is not None:
                progress(int(rows[-1]) + 1, n)
    return result


# ---------------------------------------------------------------------------------------------
# The cache: one folder per (seed, sizes, format), written once and atomically.

@dataclass
class Truth:
    """What the generator knows about the sentences of one split (rows in the split's order)."""

    z: Tensor  # [N, d] the latent each sentence was drawn from
    component: Tensor  # [N] its mixture component (0..3: means (-2,-2), (2,2), (-2,2), (2,-2))
    nll: Tensor | None = None  # [N] -log p(x), nats (valid and test only)
    nll_check: Tensor | None = None  # [N] the quadrature's doubling check, nats
    posterior_mean: Tensor | None = None  # [N, d] E[z | x] under the true posterior

    def head(self, n: int) -> "Truth":
        return Truth(*(None if t is None else t[:n] for t in (self.z, self.component, self.nll, self.nll_check,
                                                                self.posterior_mean)))


WORD = "w{}"


def vocabulary(shape: GeneratorShape = GeneratorShape()) -> list[str]:
    """Every word the generator can emit, in id order: the model's vocabulary, whatever the counts."""
    return [WORD.format(i) for i in range(shape.vocab)]


def default_cache_root() -> Path:
    """``$CVAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/cvae``, else ``~/.cache/cvae``; then ``synthetic/``."""
    base = os.environ.get("CVAE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cvae"
    return Path(base) / "synthetic"


def cache_folder(root: str | Path, seed: int, sizes: dict[str, int] | None = None) -> Path:
    sizes = sizes or SPLIT_SIZES
    return Path(root) / f"seed{seed}-{sizes['train']}-{sizes['valid']}-{sizes['test']}-v{FORMAT}"


MANIFEST = "manifest.json"
TRUTH_FILE = "truth.npz"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def generate(folder: Path, seed: int, sizes: dict[str, int] | None = None,
             log: Callable[[str], None] = lambda text: None) -> None:
    """Sample the splits and compute the truth into ``folder`` (written beside it, then renamed)."""
    sizes = sizes or SPLIT_SIZES
    started = time.perf_counter()
    lm = SyntheticLM(seed)
    stream = torch.Generator().manual_seed(seed)
    total = sum(sizes.values())
    draws = [lm.sample(min(SAMPLE_CHUNK, total - s), stream) for s in range(0, total, SAMPLE_CHUNK)]
    x, z, component = (torch.cat(parts) for parts in zip(*draws))
    sampled = time.perf_counter()
    log(f"synthetic data: sampled {total:,} sentences (seed {seed}) in {sampled - started:.1f}s")
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {}
    start = 0
    for split in ("train", "valid", "test"):
        rows = slice(start, start + sizes[split])
        start += sizes[split]
        text = "".join(" ".join(WORD.format(i) for i in row) + "\n" for row in x[rows].tolist())
        (tmp / f"{split}.txt").write_text(text, encoding="utf-8")
        arrays[f"{split}_z"], arrays[f"{split}_component"] = z[rows].numpy(), component[rows].numpy()
        if split != "train":
            def progress(done: int, n: int, split: str = split) -> None:
                log(f"synthetic data: exact -log p(x) of {split}: {done:,}/{n:,} sentences "
                    f"({time.perf_counter() - sampled:.0f}s)")
            exact = exact_nll(lm, x[rows], device="cuda" if torch.cuda.is_available() else "cpu", progress=progress)
            if exact.check.max() > TOLERANCE:
                log(f"synthetic data: warning: the exact -log p(x) of {int((exact.check > TOLERANCE).sum())} {split} "
                    f"sentences did not converge to {TOLERANCE} nats (largest check {exact.check.max():.3f})")
            arrays[f"{split}_nll"], arrays[f"{split}_nll_check"] = exact.nll.numpy(), exact.check.numpy()
            arrays[f"{split}_posterior_mean"] = exact.posterior_mean.numpy()
    np.savez(tmp / TRUTH_FILE, **arrays)
    seconds = time.perf_counter() - started
    manifest = {"format": FORMAT, "seed": seed, "sizes": sizes, "generator": "He et al. (2019) synthetic LSTM LM",
                "files": {p.name: _md5(p) for p in sorted(tmp.iterdir())}, "seconds": round(seconds, 1),
                "nll_check_max": {s: float(arrays[f"{s}_nll_check"].max()) for s in ("valid", "test")}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished the same folder first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"synthetic data: wrote {folder} in {seconds:.0f}s")


def ensure_cache(root: str | Path, seed: int, sizes: dict[str, int] | None = None,
                 log: Callable[[str], None] = lambda text: None) -> Path:
    """The cache folder of (seed, sizes) under ``root``, generated first if missing; processes that
    start together wait for the one that generates."""
    import fcntl

    folder = cache_folder(root, seed, sizes)
    if (folder / MANIFEST).is_file():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = open(folder.with_name(folder.name + ".lock"), "w")
    except OSError as exc:
        raise CvaeError(f"cannot create the synthetic data cache in {folder.parent}: {exc.strerror or exc}; "
                        "choose another folder with --data-dir (or $CVAE_CACHE_DIR)") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / MANIFEST).is_file():
            if folder.exists():
                raise CvaeError(f"synthetic data cache {folder} has no {MANIFEST} (an interrupted copy?); "
                                "delete the folder to regenerate it")
            generate(folder, seed, sizes, log)
    return folder


def _damaged(folder: Path, why: str) -> CvaeError:
    return CvaeError(f"synthetic data cache {folder} is damaged ({why}); delete the folder to regenerate it")


def read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except OSError as exc:
        raise _damaged(folder, f"{MANIFEST}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError):
        raise _damaged(folder, f"{MANIFEST} is not the manifest JSON") from None
    if manifest.get("format") != FORMAT:
        raise _damaged(folder, f"format {manifest.get('format')!r}, this version reads {FORMAT}")
    for name, md5 in files.items():
        path = folder / name
        if not path.is_file():
            raise _damaged(folder, f"{name} is missing")
        if _md5(path) != md5:
            raise _damaged(folder, f"{name} does not match its md5 in {MANIFEST}")
    return manifest


def read_split(root: str | Path, seed: int, split: str, sizes: dict[str, int] | None = None,
               log: Callable[[str], None] = lambda text: None) -> tuple[list[list[str]], str, str, Truth]:
    """One split -> (sentences as word lists, md5 of its text, source, Truth); generated on first use."""
    folder = ensure_cache(root, seed, sizes, log)
    manifest = read_manifest(folder)
    path = folder / f"{split}.txt"
    raw = path.read_bytes()
    sentences = [line.split() for line in raw.decode("utf-8").splitlines()]
    try:
        with np.load(folder / TRUTH_FILE, allow_pickle=False) as arrays:
            def array(name: str) -> Tensor | None:
                key = f"{split}_{name}"
                return torch.from_numpy(arrays[key]) if key in arrays.files else None
            truth = Truth(array("z"), array("component"), array("nll"), array("nll_check"),
                          array("posterior_mean"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise _damaged(folder, f"{TRUTH_FILE}: {exc}") from None
    expected = manifest.get("sizes", {}).get(split) if isinstance(manifest.get("sizes"), dict) else None
    if truth.z is None or len(truth.z) != len(sentences) or len(sentences) != expected:
        raise _damaged(folder, f"{split}: {len(sentences)} sentences, the truth has "
                               f"{None if truth.z is None else len(truth.z)}")
    return sentences, hashlib.md5(raw).hexdigest(), str(path), truth
