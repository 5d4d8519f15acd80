"""eNTK fidelity of zeroth-order steps: ‖J Z Zᵀ Jᵀ/q − J Jᵀ‖_F / ‖J Jᵀ‖_F vs q.

The kernel view of ZO learning: docs/concepts/literature.md §5.

One ZO-SGD step moves the outputs on a probe set by −η K̂ ∇_out L with K̂ = J Z Zᵀ Jᵀ / q, the
empirical NTK K = J Jᵀ seen through the q random directions Z (d × q). J is the (N·k) × d
Jacobian of the N probe inputs' k outputs. This tool computes J exactly (``torch.func.jacrev``)
for small MLPs of several widths, draws Z with edgezo's own direction generator
(:class:`edgezo.zo.directions.Directions`, all three kinds), and reports the relative Frobenius
error of K̂ as q grows, for two output sizes N·k; RMS over seeds and over the disjoint
q-blocks of each draw (max(q)/q independent estimates per seed).

What to expect, exactly (u = Jz ~ N(0, K) for Gaussian z)::

    E‖K̂ − K‖_F² / ‖K‖_F² = (1 + r) / q,   r = (tr K)² / ‖K‖_F²  (effective rank, ≤ N·k)

so the error depends on q and on K's effective rank r — at most the output size N·k — and not
on the parameter count d. Rademacher removes 2·Σ_a ‖J_:,a‖⁴ from the numerator (smaller at
small d; the d-dependence vanishes as d grows); sphere (fixed norm) is no worse either. The
JL bound sqrt(N·k/q) is therefore an *upper* envelope: the eNTK's spectrum decays, r < N·k, and the
measured curves sit below it (printed as ``r`` per row).

What it shows (default run: MLPs of width 8–256, d = 244 … 71,172, i.e. 290×; ≈ 25 s of
compute on two loaded shared cores, 11–40 s wall with torch's import):

- the error falls as 1/√q for every kind and width (q = 1 → 256: ≈ 2.9 → 0.18 at N·k = 8,
  ≈ 5.8 → 0.36 at N·k = 64) and matches √((1+r)/q) within a few % (Gaussian: exact in
  expectation; Rademacher and sphere are indistinguishable from it at these d);
- at fixed N·k the curves for d spanning 290× lie within a factor 1.26 of each other (max/min,
  worst cell), and what spread there is follows r (6.0 … 7.8 at N·k = 8; 23 … 36 at
  N·k = 64), not d: the smallest net has the lowest-rank kernel. With the kernel held fixed
  and d multiplied 100× (``test_entk_same_kernel_any_d_same_error``) the errors agree within
  noise;
- going from N·k = 8 to 64 shifts the curves up ≈ 2× (√(r+1) from ≈ 2.9 to ≈ 5.8). The JL
  envelope √(N·k/q) fits at N·k = 8 (r ≈ N·k) but overstates by ≈ 1.4× at N·k = 64 (r ≈ N·k/2):
  the right scale is the effective rank, bounded by the output size;
- ``--llama`` (hidden 8–64, d = 1,832 … 86,336) gives the same picture: r ≈ 6–8 at N·k = 8,
  30–45 at N·k = 64, errors on √((1+r)/q).

So to keep the ZO kernel within ε of the eNTK on a probe set, q ≈ (1 + r)/ε² — for a real
task r grows with the number of outputs the step must fit, whatever the model size.

Usage::

    python tools/entk.py [--widths 8 32 128 256] [--qs 1 4 16 64 256] [--seeds 2]
                         [--out tools/out/entk.png] [--threads 1] [--llama [HIDDEN ...]]

``--llama`` adds tiny random Llamas (2 layers, vocabulary 64, probe = random 8-token
sequences, outputs = the first k logits at the last position).

torch is used here (a desktop tool); the runtime never imports it.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, jacrev

from edgezo.zo.directions import KINDS, Directions

IN_DIM = 16
K_OUT = 4  # outputs per probe input
#: probe sizes N: the smaller probe set is the first inputs of the larger one, so its J is a
#: row block of the larger J and one projection J·Z serves both (N·k = 8 and 64)
PROBE_NS = (2, 16)
LLAMA_VOCAB, LLAMA_LEN = 64, 8  # the optional tiny Llama: vocabulary, probe sequence length


def mlp(width: int, k: int, seed: int) -> torch.nn.Module:
    """in → width → width → k with tanh, initialised from an explicit generator."""
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(IN_DIM, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, k),
    )
    with torch.no_grad():  # weights N(0, 1/fan_in), biases N(0, 0.1²)
        for p in net.parameters():
            std = 1.0 / math.sqrt(p.shape[1]) if p.ndim == 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return net


class LastLogits(torch.nn.Module):
    """A causal LM seen as a map ids → the first k logits at the last position."""

    def __init__(self, lm: torch.nn.Module, k: int):
        super().__init__()
        self.lm, self.k = lm, k

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits[:, -1, : self.k]


def llama(width: int, k: int, seed: int) -> torch.nn.Module:
    """A tiny random Llama of hidden size ``width`` (2 layers, 4 heads, vocabulary 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=LLAMA_VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):  # from_config draws from the global generator
        torch.manual_seed(seed)
        lm = LlamaForCausalLM(cfg)
    return LastLogits(lm.eval(), k)


def probe_inputs(family: str, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    if family == "llama":
        return torch.randint(0, LLAMA_VOCAB, (n, LLAMA_LEN), generator=gen)
    return torch.randn(n, IN_DIM, generator=gen)


def jacobian(net: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """J = ∂ vec(net(x)) / ∂θ as a float64 (N·k) × d array, θ flattened in parameter order."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double()
    net = net.double()

    def f(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, sizes)
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return functional_call(net, params, (x.double() if x.is_floating_point() else x,)).reshape(
            -1
        )

    return jacrev(f)(flat).numpy()


def entk(j: np.ndarray) -> np.ndarray:
    """K = J Jᵀ (float64; products in torch, which honours ``torch.set_num_threads``)."""
    t = torch.from_numpy(np.ascontiguousarray(j, dtype=np.float64))
    return (t @ t.T).numpy()


def projections(j: np.ndarray, kind: str, seed: int, q: int, block: int = 64) -> np.ndarray:
    """U = J Z (rows × q), Z's columns edgezo directions (seed, step 0, index 0..q−1).

    float32 like the runtime's directions (the products of ≤ 10⁶ terms lose ~1e-6 relative);
    the product runs in torch, so ``torch.set_num_threads`` bounds it (numpy's OpenBLAS
    would take every core, and on a loaded machine runs ~50× slower for it).
    """
    d = j.shape[1]
    dirs = Directions(seed, d, kind)
    j32 = torch.from_numpy(np.ascontiguousarray(j, dtype=np.float32))
    u = np.empty((j.shape[0], q))
    for a in range(0, q, block):
        b = min(q, a + block)
        z = np.stack([dirs.full(0, i) for i in range(a, b)], axis=1)
        u[:, a:b] = (j32 @ torch.from_numpy(z)).numpy()
    return u


def rel_error(u: np.ndarray, k: np.ndarray, q: int) -> float:
    """‖K̂_q − K‖_F/‖K‖_F with K̂_q from the first q columns of U = J Z."""
    return float(np.linalg.norm(u[:, :q] @ u[:, :q].T / q - k) / np.linalg.norm(k))


def block_sq_errors(u: np.ndarray, k: np.ndarray, q: int) -> list[float]:
    """Squared relative errors of K̂_q on each disjoint block of q columns of U.

    The blocks use different directions, so they are independent draws: a draw of 256
    directions gives 256 samples at q = 1 and 64 at q = 4 for free.
    """
    return [rel_error(u[:, b * q : (b + 1) * q], k, q) ** 2 for b in range(u.shape[1] // q)]


@dataclass
class Row:
    kind: str
    nk: int
    width: int
    d: int
    r: float  # effective rank (tr K)² / ‖K‖_F²
    theory: float  # sqrt((1 + r)) — the Gaussian RMS error at q = 1
    errors: list[float]  # RMS over seeds, one per q
    family: str = "mlp"


def study(
    widths: list[int],
    qs: list[int],
    seeds: int,
    kinds: tuple[str, ...] = KINDS,
    probe_ns: tuple[int, ...] = PROBE_NS,
    family: str = "mlp",
) -> list[Row]:
    """One row per (kind, output size, width): RMS relative error over ``seeds`` draws.

    ``family``: ``mlp`` (width = hidden width) or ``llama`` (width = hidden size).
    """
    x = probe_inputs(family, max(probe_ns))
    make = llama if family == "llama" else mlp
    found: dict[tuple[str, int, int], Row] = {}
    for w in widths:
        j = jacobian(make(w, K_OUT, seed=w), x)  # rows: input-major, k outputs each
        ks = {n: entk(j[: n * K_OUT]) for n in probe_ns}
        for kind in kinds:
            sq: dict[tuple[int, int], list[float]] = {(n, q): [] for n in probe_ns for q in qs}
            for s in range(seeds):
                u = projections(j, kind, s, max(qs))
                for n in probe_ns:
                    for q in qs:
                        sq[(n, q)] += block_sq_errors(u[: n * K_OUT], ks[n], q)
            for n in probe_ns:
                k = ks[n]
                r = float(np.trace(k) ** 2 / np.sum(k * k))
                rms = np.sqrt([np.mean(sq[(n, q)]) for q in qs])
                found[(kind, n, w)] = Row(
                    kind, n * K_OUT, w, j.shape[1], r, math.sqrt(1 + r), rms.tolist(), family
                )
    return [found[(kind, n, w)] for kind in kinds for n in probe_ns for w in widths]


def print_table(rows: list[Row], qs: list[int]) -> None:
    head = f"{'model':<6} {'kind':<10} {'N·k':>4} {'width':>5} {'d':>8} {'r':>6}  " + "  ".join(
        f"{'q=' + str(q):>7}" for q in qs
    )
    print(head + "   (RMS relative Frobenius error; theory = sqrt((1+r)/q), Gaussian)")
    print("-" * len(head))
    last = None
    for row in rows:
        if last is not None and (row.family, row.kind, row.nk) != last:
            print()
        last = (row.family, row.kind, row.nk)
        print(
            f"{row.family:<6} {row.kind:<10} {row.nk:>4} {row.width:>5} {row.d:>8,} "
            f"{row.r:>6.1f}  " + "  ".join(f"{e:>7.3f}" for e in row.errors)
        )
        if row.kind == "gaussian":
            print(
                f"{'':<6} {'  theory':<10} {'':>4} {'':>5} {'':>8} {'':>6}  "
                + "  ".join(f"{row.theory / math.sqrt(q):>7.3f}" for q in qs)
            )


def plot(rows: list[Row], qs: list[int], out: Path, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nks = sorted({r.nk for r in rows})
    fig, axes = plt.subplots(1, len(nks), figsize=(5.4 * len(nks), 4.4), sharey=True)
    axes = np.atleast_1d(axes)
    qq = np.array(qs, dtype=float)
    for ax, nk in zip(axes, nks, strict=True):
        rs = []
        for family, style, cmap in (("mlp", "o-", plt.cm.viridis), ("llama", "s--", plt.cm.autumn)):
            sel = [r for r in rows if r.nk == nk and r.kind == kind and r.family == family]
            for i, r in enumerate(sel):
                c = cmap(i / max(1, len(sel) - 1) * (0.8 if family == "llama" else 1.0))
                ax.loglog(
                    qq, r.errors, style, color=c, ms=5, label=f"{family} width {r.width}, d={r.d:,}"
                )
                ax.loglog(qq, r.theory / np.sqrt(qq), ":", color=c, lw=1)
                rs.append(f"{r.r:.0f}")
        ax.loglog(qq, np.sqrt(nk / qq), "k--", lw=1.2, label=f"JL envelope √(N·k/q), N·k={nk}")
        ax.set_title(f"N·k = {nk}  (effective ranks r = {', '.join(rs)})", fontsize=9)
        ax.set_xlabel("q (directions)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"‖K̂ − K‖_F / ‖K‖_F  ({kind}; dotted: √((1+r)/q))")
    fig.suptitle(
        "ZO kernel J Z Zᵀ Jᵀ/q vs eNTK J Jᵀ: depends on q and output size, not d", fontsize=10
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 32, 128, 256])
    ap.add_argument("--qs", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--seeds", type=int, default=2, help="direction seeds averaged (RMS)")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument(
        "--plot-kind",
        default="rademacher",
        choices=KINDS,
        help="direction kind drawn in the PNG (rademacher: the runtime's default)",
    )
    ap.add_argument("--out", type=Path, default=Path("tools/out/entk.png"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    ap.add_argument(
        "--llama",
        type=int,
        nargs="*",
        default=None,
        metavar="HIDDEN",
        help="also tiny random Llamas of these hidden sizes (default 8 16 32 64; "
        "outputs: the first k logits at the last position; needs transformers)",
    )
    args = ap.parse_args(argv)
    if min(args.qs) < 1 or args.seeds < 1 or min(args.widths) < 1:
        ap.error("--qs, --seeds and --widths must be >= 1")
    torch.set_num_threads(args.threads)
    qs = sorted(set(args.qs))

    t0 = time.perf_counter()
    rows = study(args.widths, qs, args.seeds, tuple(args.kinds))
    if args.llama is not None:
        rows += study(
            args.llama or [8, 16, 32, 64], qs, args.seeds, tuple(args.kinds), family="llama"
        )
    print_table(rows, qs)
    print(
        f"\n{args.seeds} seeds × max(q)/q disjoint blocks per cell, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    if not args.no_plot and args.plot_kind in args.kinds:
        plot(rows, qs, args.out, args.plot_kind)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
