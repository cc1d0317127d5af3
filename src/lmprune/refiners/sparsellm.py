"""SparseLLM (Bai et al. 2024, arXiv 2402.17946): prune a block's MLP as one coupled problem.

Layer-wise methods prune every Linear alone, each reproducing its own dense output. SparseLLM
instead asks the pruned MLP as a whole to reproduce the dense MLP's output Y on its input X, by
splitting the MLP at its hidden activations with auxiliary variables and soft constraints:

    non-gated (OPT: fc1 → act → fc2)          gated (Llama: down(act(gate x) ⊙ up x))
    z = W_up X + b_up     (pre-activation)     z = W_up X,  s = W_gate X  (gate pre-activation)
    p = act(z)            (input of down)      p = act(s) ⊙ z
    Y ≈ W_down p + b_down

    min  α‖z − W_up X‖² [+ α‖s − W_gate X‖²] + β‖Y − W_down p − b_down‖² + γ‖p − a(z, s)‖²
    over sparse W_up, W_gate, W_down and free z, s, p, with a(z, s) = act(z) or act(s) ⊙ z.

Every sub-problem is easy, so we alternate (block coordinate descent), one epoch being:

1. W: each weight is re-fitted to its current targets by least squares — W_up = argmin‖z − b − WX‖
   (normal equations XᵀX Wᵀ = Xᵀ(z − b), float64, a tiny ridge), W_down from (p, Y − b_down) alike —
   and pruned with the layer-wise solver (SparseGPT by default) on the Gram matrix of its input
   (XᵀX, resp. pᵀp). Since the least-squares fit leaves a residual orthogonal to the input, pruning it
   for ‖(W_ls − Ŵ)X‖ is pruning for ‖target − ŴX‖. Epoch 0 starts from the dense aux variables, whose
   exact fits are the dense weights: it is layer-wise pruning on the inputs of the pruned attention.
2. p ← (βW_downᵀW_down + γI)⁻¹(βW_downᵀ(Y − b_down) + γa)                    (closed form)
3. z: ReLU — per element the better of the z ≥ 0 candidate max(0, (αm + γp)/(α + γ)) and the z ≤ 0
   candidate min(0, m), m = W_up X + b_up; gated — z = (αm + γ act(s)⊙p)/(α + γ act(s)²), the paper's
   (m + act(s)⊙p)/(act(s)² + 1) when α = γ; any other elementwise activation — Gauss-Newton steps.
4. s (gated only): `s_steps` Gauss-Newton-scaled gradient steps on α‖s − W_gate X‖² + γ‖p − act(s)⊙z‖²,
   elementwise, a step kept only where it lowers that objective (the paper uses plain gradient steps).

Steps 2–4 use the pruned weights of step 1. `epochs` counts the W steps (the authors' 4); after each
one the pruned MLP's true output error ‖MLP(X) − Y‖² is measured. Only the ratios α:β:γ matter here
(every update is invariant to scaling all three), so the paper's OPT defaults 0.1/0.1/0.1 and Llama
defaults 5/5/5 are both "equal weights"; they are kept as the defaults by architecture. (On
stories260K at 80%, a larger γ, e.g. alpha=1 beta=1 gamma=20, gave a clearly lower perplexity than
equal weights; tune per model.) The layer solver is `layer_method` (any pruning method, e.g.
admm-grad) with its own `--opt` keys; `--update admm` gives SparseGPT's mask with ADMM's update.

Robustness (the authors' issue #15, NaNs): a non-finite value anywhere stops the block's iterations and
the block keeps the layer-wise weights; so does an MLP output error not below the layer-wise one. With
`keep_best` (default) the epoch with the lowest output error is kept, else the last one. The report
says which, per block. Attention layers stay layer-wise.

The MLP is found by structure, not by name: the block is run once with hooks on its Linear layers, and
a layer D is a down projection if its input is, numerically, act(U(x)) for another layer U
(non-gated) or act(G(x)) ⊙ U(x) for two layers G, U reading the same input (gated: G is the gate,
U the up projection). The activation is taken from the block (its activation modules: Llama's
`act_fn`, OPT's `activation_fn`, any torch.nn / transformers activation), from the config's
`hidden_act`/`activation_function` via ACT2FN, or a standard one, whichever reproduces D's input.
OPT's fc1/fc2 live directly in the decoder layer; that is no different. Fused gate_up projections,
norms inside the MLP, or MLP layers excluded with --skip: the block stays layer-wise (reported).

Memory: per block, all calibration tokens T of X and Y (T × d each) and of z, s, p (T × F each, F the
MLP width), float32, plus token-chunked temporaries: about 4·T·(2d + 3F) bytes (2d + 2F non-gated).
stories260K at 128 × 256 tokens: 32768·(128 + 516)·4 ≈ 85 MB; Llama-7B at 128 × 2048: ≈ 43 GB. They
stay on the compute device when it has room (2× the estimate free), otherwise on the CPU, with every
token-sized operation streamed through the device in chunks of `chunk_tokens`. Gram matrices and
weights (d², F², F·d) always live on the device.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import settings_from_options
from ..errors import LmpruneError
from ..hidden import block_outputs
from ..hooks import hooked

Activation = Callable[[torch.Tensor], torch.Tensor]
Pruner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (W [out, in], H = AᵀA [in, in]) -> pruned W

# Authors' defaults (their code: OPT 0.1, Llama 5 for each of α, β, γ).
_DEFAULT_PENALTY = {False: 0.1, True: 5.0}


# --------------------------------------------------------------------------------------------------
# Settings and the CLI entry point
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseLLMSettings:
    layer_method: str = "sparsegpt"  # the layer-wise solver (prunes every layer, and the MLP refits)
    epochs: int = 4  # W steps per block (the first prunes the dense weights on the sequential inputs)
    alpha: float | None = None  # weight of ‖z − W_up X‖² (and the gate's); None/auto: 0.1 (ReLU/GELU), 5 (gated)
    beta: float | None = None  # weight of ‖Y − W_down p − b‖²
    gamma: float | None = None  # weight of ‖p − a(z, s)‖²
    s_steps: int = 3  # Gauss-Newton steps on s (and on z for smooth non-gated activations) per epoch
    refit_damping: float = 1e-6  # ridge of the least-squares re-fits, relative to mean(diag AᵀA)
    keep_best: bool = True  # keep the epoch with the lowest MLP output error (else the last epoch)
    chunk_tokens: int = 16384  # tokens per chunk of the token-sized operations

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if isinstance(value, str):  # from --opt: a number or "auto"
                try:
                    value = None if value.strip().lower() == "auto" else float(value)
                except ValueError:
                    raise ValueError(f"{name}={value!r}: expected a positive number or 'auto'") from None
                object.__setattr__(self, name, value)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number or 'auto', got {value}")
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        if self.s_steps < 0:
            raise ValueError("s_steps must be non-negative")
        if not 0 <= self.refit_damping < 1:
            raise ValueError("refit_damping must be in [0, 1)")
        if self.chunk_tokens < 1:
            raise ValueError("chunk_tokens must be positive")

    def penalties(self, gated: bool) -> tuple[float, float, float]:
        default = _DEFAULT_PENALTY[gated]
        return tuple(default if v is None else float(v) for v in (self.alpha, self.beta, self.gamma))


# For `lmprune methods`.
DESCRIPTION = "MLP pruned jointly via auxiliary variables, closed-form alternating updates (Bai et al. 2024)"


@dataclass
class BlockMethod:
    """What the CLI needs: the layer-wise solver to build, and the block refiner to run after it."""

    layer_method: str
    layer_options: dict[str, str]
    refiner: "SparseLLMRefiner"
    settings: dict[str, Any]


def build_block_method(options: dict[str, str]) -> BlockMethod:
    """Split `--opt` into SparseLLM's settings and the layer solver's options; validate ours."""
    from ..solvers import get_solver, method_names

    known = {f.name for f in fields(SparseLLMSettings)}
    mine = {k: v for k, v in options.items() if k.replace("-", "_") in known}
    rest = {k: v for k, v in options.items() if k.replace("-", "_") not in known}
    settings = settings_from_options(SparseLLMSettings, mine, "sparsellm")
    if settings.layer_method == "sparsellm":
        raise LmpruneError("layer_method must be a layer-wise method, not sparsellm")
    if settings.layer_method not in method_names():
        get_solver(settings.layer_method)  # unknown names: the registry's error
        raise LmpruneError(
            f"layer_method={settings.layer_method!r} only updates weights; choose a pruning method "
            f"({', '.join(method_names())}) and add --update {settings.layer_method} for its update"
        )
    if get_solver(settings.layer_method).needs_input_stats:
        raise LmpruneError(
            f"layer_method={settings.layer_method!r} needs the inputs' mean, which SparseLLM's "
            "subproblems do not track; choose a method that needs only XᵀX"
        )
    report = {f"sparsellm_{f.name}": getattr(settings, f.name) for f in fields(settings)}
    for name in ("alpha", "beta", "gamma"):
        if report[f"sparsellm_{name}"] is None:
            report[f"sparsellm_{name}"] = "auto"
    return BlockMethod(settings.layer_method, rest, SparseLLMRefiner(settings), report)


# --------------------------------------------------------------------------------------------------
# Pure tensor math: no modules, no hooks
# --------------------------------------------------------------------------------------------------


@dataclass
class MLPWeights:
    """y = down·φ(x) + b_down, φ = act(up·x + b_up), or act(gate·x + b_gate) ⊙ (up·x + b_up) if gated.

    Weights are float32 [out, in]; biases float32 [out] or None.
    """

    up: torch.Tensor
    down: torch.Tensor
    gate: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def to(self, device) -> "MLPWeights":
        return MLPWeights(*(None if t is None else t.to(device=device, dtype=torch.float32) for t in (
            self.up, self.down, self.gate, self.up_bias, self.down_bias, self.gate_bias)))

    def is_finite(self) -> bool:
        return all(t is None or bool(torch.isfinite(t).all()) for t in (self.up, self.down, self.gate))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def mlp_hidden(X: torch.Tensor, mlp: MLPWeights, act: Activation):
    """(z, s, p): up pre-activation, gate pre-activation (None if not gated), input of down."""
    z = _linear(X, mlp.up, mlp.up_bias)
    if mlp.gated:
        s = _linear(X, mlp.gate, mlp.gate_bias)
        return z, s, act(s) * z
    return z, None, act(z)


def mlp_forward(X: torch.Tensor, mlp: MLPWeights, act: Activation) -> torch.Tensor:
    return _linear(mlp_hidden(X, mlp, act)[2], mlp.down, mlp.down_bias)


def _chunks(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class _Stream:
    """Token-sized tensors kept on `store`, processed on `device` chunk by chunk."""

    def __init__(self, device: torch.device, store: torch.device, chunk: int, tokens: int):
        self.device, self.store, self.chunk, self.tokens = device, store, chunk, tokens

    def slices(self):
        return _chunks(self.tokens, self.chunk)

    def get(self, t: torch.Tensor, sl: slice) -> torch.Tensor:
        return t[sl].to(self.device, torch.float32)

    def gram(self, A: torch.Tensor, B: torch.Tensor | None = None) -> torch.Tensor:
        """AᵀB (AᵀA if B is None) in float64 on the device."""
        out = None
        for sl in self.slices():
            a = self.get(A, sl).double()
            b = a if B is None else self.get(B, sl).double()
            out = a.t() @ b if out is None else out.addmm_(a.t(), b)
        return out

    def error(self, X: torch.Tensor, Y: torch.Tensor, mlp: MLPWeights, act: Activation) -> float:
        """‖MLP(X) − Y‖² summed in float64."""
        total = 0.0
        for sl in self.slices():
            diff = mlp_forward(self.get(X, sl), mlp, act) - self.get(Y, sl)
            total += float(diff.double().pow(2).sum())
        return total


class _NonFinite(Exception):
    pass


def _check(t: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise _NonFinite(what)
    return t


def least_squares(gram: torch.Tensor, cross: torch.Tensor, damping: float) -> torch.Tensor:
    """W [out, in] minimising ‖T − A Wᵀ‖² + λ‖W‖², from G = AᵀA and C = AᵀT (float64), λ = damping·mean diag G.

    Normal equations by Cholesky in float64 (never a pseudo-inverse in low precision); inputs never
    active (zero Gram diagonal) get zero weight.
    """
    G = gram.double().clone()
    diag = torch.diagonal(G)
    dead = diag <= 0
    mean = float(diag[~dead].mean()) if (~dead).any() else 1.0
    G[dead, dead] = mean
    G += max(damping, 1e-12) * mean * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G)
    if info != 0:
        W = torch.linalg.lstsq(G, cross.double()).solution
    else:
        W = torch.cholesky_solve(cross.double(), L)
    W[dead] = 0.0
    return W.t().to(torch.float32)


def _activation_grad(act: Activation, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(x), act'(x)) elementwise, by autograd (any elementwise activation)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = act(x)
        (g,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), g.detach()


def is_relu(act: Activation) -> bool:
    probe = torch.linspace(-4.0, 4.0, 161)
    try:
        return torch.equal(act(probe), torch.relu(probe))
    except Exception:  # noqa: BLE001 - an activation that cannot take a 1-D tensor is not ReLU
        return False


def update_p(W_down: torch.Tensor, target: torch.Tensor, a: torch.Tensor, beta: float, gamma: float,
             inverse: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_p β‖target − W_down p‖² + γ‖p − a‖², row per token: p = (βtarget·W + γa)(βWᵀW + γI)⁻¹."""
    if inverse is None:
        inverse = _p_inverse(W_down, beta, gamma)
    return (beta * (target @ W_down) + gamma * a) @ inverse


def _p_inverse(W_down: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    W = W_down.double()
    M = beta * (W.t() @ W) + gamma * torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(M)).to(torch.float32)


# Elementwise chains over token-sized tensors run in row blocks on the CPU, so that each block's
# temporaries stay in cache instead of being allocated (and page-faulted in) at tokens × width: 7× faster
# for the Gauss-Newton steps at 8192 × 1536, and bitwise the same. On a GPU one pass is faster.
_ELEMENTWISE_ROWS = 512


def _row_blocked(fn):
    """Apply elementwise `fn(first, *args)` to row blocks of every tensor argument (all row-aligned)."""

    @functools.wraps(fn)
    def blocked(first: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if first.device.type != "cpu" or first.shape[0] <= _ELEMENTWISE_ROWS:
            return fn(first, *args, **kwargs)
        out = torch.empty_like(first)
        for sl in _chunks(first.shape[0], _ELEMENTWISE_ROWS):
            out[sl] = fn(first[sl], *(a[sl] if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
        return out

    return blocked


@_row_blocked
def update_z_relu(m: torch.Tensor, p: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """argmin_z α(z − m)² + γ(p − relu z)², elementwise: the better of the z ≥ 0 and z ≤ 0 branches."""
    z_pos = ((alpha * m + gamma * p) / (alpha + gamma)).clamp_min(0)
    z_neg = m.clamp_max(0)
    f_pos = alpha * (z_pos - m) ** 2 + gamma * (p - z_pos) ** 2
    f_neg = alpha * (z_neg - m) ** 2 + gamma * p**2
    return torch.where(f_pos <= f_neg, z_pos, z_neg)


@_row_blocked
def update_z_gated(m: torch.Tensor, p: torch.Tensor, sigma: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """argmin_z α(z − m)² + γ(p − σ⊙z)², σ = act(s): z = (αm + γσp)/(α + γσ²)."""
    return (alpha * m + gamma * sigma * p) / (alpha + gamma * sigma**2)


@_row_blocked
def gauss_newton(x: torch.Tensor, m: torch.Tensor, p: torch.Tensor, scale: torch.Tensor | None, act: Activation,
                 alpha: float, gamma: float, steps: int) -> torch.Tensor:
    """Elementwise steps on f(x) = α(x − m)² + γ(p − act(x)·scale)² (scale = 1 if None).

    Step −f'/(2α + 2γ(act'(x)·scale)²) (Gauss-Newton, i.e. gradient steps scaled per element); a step
    is kept only where it lowers f, so f never increases.
    """
    c = 1.0 if scale is None else scale

    def objective(v, av):
        return alpha * (v - m) ** 2 + gamma * (p - av * c) ** 2

    a, da = _activation_grad(act, x)
    f = objective(x, a)
    for _ in range(steps):
        J = da * c
        r = p - a * c
        step = (alpha * (x - m) - gamma * r * J) / (alpha + gamma * J**2)
        x_new = x - step
        a_new, da_new = _activation_grad(act, x_new)
        f_new = objective(x_new, a_new)
        better = f_new < f
        x = torch.where(better, x_new, x)
        a = torch.where(better, a_new, a)
        da = torch.where(better, da_new, da)
        f = torch.where(better, f_new, f)
    return x


@dataclass
class SparseLLMResult:
    weights: MLPWeights  # the kept weights (the layer-wise ones if SparseLLM did not help)
    kept: str  # "layerwise" or "epoch N"
    errors: dict[str, float]  # relative MLP output error ‖MLP(X) − Y‖²/‖Y‖² per candidate
    note: str | None = None  # why the layer-wise result was kept, if it was

    @property
    def improved(self) -> bool:
        return self.kept != "layerwise"


def sparsellm_mlp(
    X: torch.Tensor,
    Y: torch.Tensor,
    dense: MLPWeights,
    layerwise: MLPWeights,
    act: Activation,
    prune: Pruner,
    settings: SparseLLMSettings = SparseLLMSettings(),
    device: torch.device | None = None,
) -> SparseLLMResult:
    """Prune an MLP jointly so that MLP(X) ≈ Y; returns the better of that and the layer-wise weights.

    X [tokens, d] are the MLP's inputs, Y [tokens, d_out] the dense MLP's outputs on them (either may
    live on the CPU; work is streamed through `device` in chunks). `dense` gives the starting targets
    and biases (biases are kept), `layerwise` the layer-wise pruned weights to beat, `prune(W, H)` the
    layer-wise solver. See the module docstring for the algorithm.
    """
    device = device or X.device
    store = X.device
    tokens = X.shape[0]
    io = _Stream(device, store, settings.chunk_tokens, tokens)
    given = layerwise  # returned as is when it is kept
    dense, layerwise = dense.to(device), layerwise.to(device)
    name = "layerwise"
    gated = dense.gated
    alpha, beta, gamma = settings.penalties(gated)
    relu = not gated and is_relu(act)

    y_norm = max(sum(float(io.get(Y, sl).double().pow(2).sum()) for sl in io.slices()), 1e-30)
    errors = {"layerwise": io.error(X, Y, layerwise, act) / y_norm}
    best = ("layerwise", given)  # only the best weights so far are kept (and the last)

    # Aux variables from the dense MLP: the ideal targets.
    z = torch.empty(tokens, dense.up.shape[0], device=store)
    s = torch.empty_like(z) if gated else None
    p = torch.empty_like(z)
    for sl in io.slices():
        zc, sc, pc = mlp_hidden(io.get(X, sl), dense, act)
        z[sl], p[sl] = zc.to(store), pc.to(store)
        if gated:
            s[sl] = sc.to(store)

    G_X = io.gram(X)
    H_X = G_X.to(torch.float32)
    current = dense
    try:
        for epoch in range(settings.epochs):
            if epoch > 0:
                _aux_step(X, Y, z, s, p, current, act, relu, alpha, beta, gamma, settings, io)
            # 1. W: re-fit to the targets, then prune layer-wise.
            G_p = io.gram(p)
            if epoch == 0:  # exact fits of the dense aux variables are the dense weights
                up_t, down_t, gate_t = dense.up, dense.down, dense.gate
            else:
                damping = settings.refit_damping
                up_t = least_squares(G_X, _cross(io, X, z, dense.up_bias), damping)
                gate_t = least_squares(G_X, _cross(io, X, s, dense.gate_bias), damping) if gated else None
                down_t = least_squares(G_p, _cross(io, p, Y, dense.down_bias), damping)
            current = replace(
                dense,
                up=_check(prune(_check(up_t, "up re-fit"), H_X), "up pruning"),
                down=_check(prune(_check(down_t, "down re-fit"), G_p.to(torch.float32)), "down pruning"),
                gate=_check(prune(_check(gate_t, "gate re-fit"), H_X), "gate pruning") if gated else None,
            )
            name = f"epoch {epoch}"
            errors[name] = io.error(X, Y, current, act) / y_norm
            if not math.isfinite(errors[name]):
                raise _NonFinite(f"MLP output at {name}")
            if errors[name] < errors[best[0]]:
                best = (name, current)
    except _NonFinite as exc:
        return SparseLLMResult(given, "layerwise", errors, f"non-finite values ({exc}); kept the layer-wise weights")
    except torch.linalg.LinAlgError as exc:
        note = f"linear algebra failed ({str(exc).splitlines()[0]}); kept the layer-wise weights"
        return SparseLLMResult(given, "layerwise", errors, note)

    kept, weights = best if settings.keep_best else (name, current)
    if kept == "layerwise" or errors[kept] >= errors["layerwise"]:
        return SparseLLMResult(given, "layerwise", errors, "no epoch beat the layer-wise MLP output error")
    return SparseLLMResult(weights, kept, errors)


def _cross(io: _Stream, A: torch.Tensor, T: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Aᵀ(T − b) in float64 on the device."""
    out = None
    for sl in io.slices():
        a = io.get(A, sl).double()
        t = io.get(T, sl)
        if bias is not None:
            t = t - bias
        out = a.t() @ t.double() if out is None else out.addmm_(a.t(), t.double())
    return out


def _aux_step(X, Y, z, s, p, mlp: MLPWeights, act, relu, alpha, beta, gamma, settings, io: _Stream) -> None:
    """Steps 2–4 in place, token chunk by token chunk: p, then z, then s (gated), on the pruned weights."""
    inverse = _p_inverse(mlp.down, beta, gamma)
    for sl in io.slices():
        x, zc = io.get(X, sl), io.get(z, sl)
        sc = io.get(s, sl) if mlp.gated else None
        target = io.get(Y, sl)
        if mlp.down_bias is not None:
            target = target - mlp.down_bias
        a = act(sc) * zc if mlp.gated else act(zc)
        pc = _check(update_p(mlp.down, target, a, beta, gamma, inverse), "p update")
        m = _linear(x, mlp.up, mlp.up_bias)
        if mlp.gated:
            zc = _check(update_z_gated(m, pc, act(sc), alpha, gamma), "z update")
            m_s = _linear(x, mlp.gate, mlp.gate_bias)
            sc = _check(gauss_newton(sc, m_s, pc, zc, act, alpha, gamma, settings.s_steps), "s update")
            s[sl] = sc.to(io.store)
        elif relu:
            zc = _check(update_z_relu(m, pc, alpha, gamma), "z update")
        else:
            zc = _check(gauss_newton(zc, m, pc, None, act, alpha, gamma, settings.s_steps), "z update")
        z[sl], p[sl] = zc.to(io.store), pc.to(io.store)


def mlp_outputs(X: torch.Tensor, mlp: MLPWeights, act: Activation, device: torch.device, chunk: int) -> torch.Tensor:
    """MLP(X) [tokens, d_out], stored where X is, computed on `device` chunk by chunk."""
    mlp = mlp.to(device)
    out = torch.empty(X.shape[0], mlp.down.shape[0], device=X.device)
    with torch.no_grad():
        for sl in _chunks(X.shape[0], chunk):
            out[sl] = mlp_forward(X[sl].to(device, torch.float32), mlp, act).to(X.device)
    return out


# --------------------------------------------------------------------------------------------------
# Model-facing adapter: find the MLP by structure, capture its inputs, write the weights back
# --------------------------------------------------------------------------------------------------

_MATCH_TOLERANCE = 2e-2  # relative mismatch allowed between a traced down-projection input and its model
_TRACE_TOKENS = 2048  # tokens of the first batch used to recognise the MLP


@dataclass
class FoundMLP:
    up: Any  # PrunableLayer
    down: Any
    gate: Any | None
    act: Activation
    act_name: str
    mismatch: float  # relative error of the recognised structure on the traced tokens

    @property
    def layers(self):
        return [layer for layer in (self.up, self.gate, self.down) if layer is not None]


def _standard_activations() -> list[tuple[str, Activation]]:
    return [
        ("relu", torch.relu),
        ("silu", F.silu),
        ("gelu", F.gelu),
        ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    ]


def activation_candidates(block: nn.Module) -> list[tuple[str, Activation]]:
    """Activations the block may use: its own activation modules and function attributes, the
    config's named activation (ACT2FN), then standard ones. The trace decides which one fits."""
    found: list[tuple[str, Activation]] = []
    for name, module in block.named_modules():
        kind = type(module).__module__
        if kind.startswith(("torch.nn.modules.activation", "transformers.activations")):
            found.append((f"{name or 'block'} ({type(module).__name__})", module))
        for attr, value in vars(module).items():
            if attr.startswith("_") or isinstance(value, nn.Module):
                continue
            origin = getattr(value, "__module__", None) or ""
            if callable(value) and not isinstance(value, type) and origin.startswith("torch"):
                found.append((f"{name or 'block'}.{attr}", value))
    try:
        from transformers.activations import ACT2FN
    except ImportError:  # pragma: no cover - transformers is a dependency
        ACT2FN = {}
    for module in block.modules():
        config = getattr(module, "config", None)
        for key in ("hidden_act", "activation_function", "hidden_activation"):
            value = getattr(config, key, None)
            if isinstance(value, str) and value in ACT2FN:
                found.append((f"config.{key}={value}", ACT2FN[value]))
    return found + _standard_activations()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(a.norm())
    if scale == 0 or not math.isfinite(scale):
        return math.inf
    return float((a - b).norm()) / scale


def recognise_mlps(traces: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   candidates: list[tuple[str, Activation]]) -> list[tuple[str, str | None, str, str, Activation, float]]:
    """From traced (input, output) float32 [tokens, features] per layer name, the MLPs of the block.

    A layer D is a down projection when its input equals act(U out) (non-gated, up = U) or
    act(G out) ⊙ U out with G and U reading the same input (gated). Returns
    (up, gate or None, down, activation name, activation, mismatch) for each, best fit first.
    """
    keys = list(traces)
    found = []
    used: set[str] = set()
    for d in keys:
        d_in = traces[d][0]
        feeders = [u for u in keys if u != d and traces[u][1].shape == d_in.shape]
        best = None
        for act_name, act in candidates:
            try:
                acted = {u: act(traces[u][1]) for u in feeders}
            except Exception:  # noqa: BLE001 - not an elementwise activation of a tensor
                continue
            options = [(u, None) for u in feeders]
            options += [(u, g) for g in feeders for u in feeders
                        if u != g and torch.equal(traces[u][0], traces[g][0])]
            for u, g in options:
                model = acted[u] if g is None else acted[g] * traces[u][1]
                if model.shape != d_in.shape:
                    continue
                mismatch = _relative(d_in, model)
                if mismatch < _MATCH_TOLERANCE and (best is None or mismatch < best[-1]):
                    best = (u, g, d, act_name, act, mismatch)
        if best is not None:
            names = {best[0], d} | ({best[1]} if best[1] is not None else set())
            if not names & used:
                found.append(best)
                used |= names
    return found


class SparseLLMRefiner:
    """The pipeline's BlockRefiner: after the layer-wise pass, re-prune the block's MLP(s) jointly."""

    def __init__(self, settings: SparseLLMSettings | None = None):
        self.settings = settings or SparseLLMSettings()

    def __call__(self, ctx) -> dict[str, Any]:
        tick = time.perf_counter()
        mlps, note = self.find(ctx)
        record: dict[str, Any] = {"method": "sparsellm", "mlps": []}
        if note:
            record["note"] = note
        if mlps:
            inputs = self.capture(ctx, mlps)
            for mlp in mlps:
                record["mlps"].append(self.refine(ctx, mlp, inputs.pop(mlp.up.name)))
        record["seconds"] = time.perf_counter() - tick
        return record

    # -- recognition -----------------------------------------------------------------------------

    def find(self, ctx) -> tuple[list[FoundMLP], str | None]:
        """Trace the block on (the start of) the first batch and recognise its MLP(s)."""
        from ..model import ExpertSlice, LinearLayer, is_prunable

        pruned = {id(layer.module): layer for layer in ctx.layers if not isinstance(layer, ExpertSlice)}
        # Experts in fused tensors are not Linear modules: their MLPs keep the layer-wise result.
        fused = sorted({layer.name.rsplit("[", 1)[0] for layer in ctx.layers if isinstance(layer, ExpertSlice)})
        layers = {}
        for name, module in ctx.block.named_modules():
            if is_prunable(module):
                layers[id(module)] = pruned.get(id(module)) or LinearLayer(f"(not pruned) {name}", module)
        by_name = {layer.name: layer for layer in layers.values()}
        traces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def make_hook(name):
            def hook(module, args, output):
                if name not in traces and args and isinstance(output, torch.Tensor):
                    x = args[0].detach().reshape(-1, args[0].shape[-1])[:_TRACE_TOKENS].float()
                    y = output.detach().reshape(-1, output.shape[-1])[:_TRACE_TOKENS].float()
                    traces[name] = (x, y)
            return hook

        with hooked([(layer.module, make_hook(layer.name)) for layer in layers.values()]), torch.no_grad():
            ctx.inputs.call(ctx.block, 0, ctx.hidden[0].to(ctx.device), ctx.device)
        found = recognise_mlps(traces, activation_candidates(ctx.block))
        moe_note = f"MoE experts left to the layer-wise pass: {', '.join(fused)}" if fused else None
        if not found:
            note = "no MLP recognised (down(act(up x)) or down(act(gate x) ⊙ up x)); kept layer-wise"
            return [], "; ".join(filter(None, [note, moe_note]))
        mlps, skipped = [], []
        for up, gate, down, act_name, act, mismatch in found:
            mlp = FoundMLP(by_name[up], by_name[down], by_name[gate] if gate else None, act, act_name, mismatch)
            if any(id(layer.module) not in pruned for layer in mlp.layers):
                skipped.append(mlp.down.name)
            else:
                mlps.append(mlp)
        note = None
        if skipped:
            note = f"MLP(s) with layers excluded from pruning kept as they are: {', '.join(skipped)}"
        return mlps, "; ".join(filter(None, [note, moe_note])) or None

    # -- refinement ------------------------------------------------------------------------------

    def _store(self, ctx, tokens: int, d: int, width: int) -> torch.device:
        """The device if the token-sized tensors fit with room to spare, else the CPU."""
        device = ctx.device
        if device.type != "cuda":
            return device
        need = 4 * tokens * (2 * d + 3 * width) + 4 * self.settings.chunk_tokens * (2 * d + 8 * width)
        free, _ = torch.cuda.mem_get_info(device)
        return device if 2 * need < free else torch.device("cpu")

    def capture(self, ctx, mlps: list[FoundMLP]) -> dict[str, torch.Tensor]:
        """Each MLP's input X [tokens, d] (float32) for every calibration token, in one pass of the block.

        Attention is already pruned, so X is what the pruned block feeds its MLP.
        """
        tokens = sum(h[..., 0].numel() for h in ctx.hidden)
        captured: dict[str, list[torch.Tensor]] = {mlp.up.name: [] for mlp in mlps}
        taps = []
        for mlp in mlps:
            store = self._store(ctx, tokens, mlp.up.in_features, mlp.up.out_features)

            def hook(module, args, name=mlp.up.name, store=store):
                x = args[0].detach()
                captured[name].append(x.reshape(-1, x.shape[-1]).to(store, torch.float32))

            taps.append((mlp.up.module, hook))
        with hooked(before=taps):
            for _ in block_outputs(ctx.block, ctx.inputs, ctx.hidden, ctx.device):
                pass
        out = {}
        for mlp in mlps:
            parts = captured.pop(mlp.up.name)
            out[mlp.up.name] = torch.cat(parts) if parts else torch.empty(0, mlp.up.in_features)
            del parts
        return out

    def refine(self, ctx, mlp: FoundMLP, X: torch.Tensor) -> dict[str, Any]:
        settings = self.settings
        store = X.device

        def bias(layer):
            b = getattr(layer.module, "bias", None)
            return None if b is None else b.detach().to(torch.float32).clone()

        def weights(get) -> MLPWeights:
            return MLPWeights(get(mlp.up), get(mlp.down), get(mlp.gate) if mlp.gate else None,
                              bias(mlp.up), bias(mlp.down), bias(mlp.gate) if mlp.gate else None)

        dense = weights(lambda layer: ctx.dense_weights[layer.name])
        layerwise = weights(lambda layer: layer.get_weight(ctx.device))
        alpha, beta, gamma = settings.penalties(dense.gated)
        record: dict[str, Any] = {
            "up": mlp.up.name, "gate": mlp.gate.name if mlp.gate else None, "down": mlp.down.name,
            "activation": mlp.act_name,
            "kind": "gated" if dense.gated else ("relu" if is_relu(mlp.act) else "elementwise"),
            "tokens": int(X.shape[0]), "alpha": alpha, "beta": beta, "gamma": gamma,
            "store": str(store),
        }
        if X.shape[0] == 0:
            record.update(kept="layerwise", note="the MLP saw no calibration tokens")
            return record

        def prune(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
            return ctx.layer_solver(W.to(ctx.device), H.to(ctx.device), ctx.pattern).weight.to(torch.float32)

        Y = mlp_outputs(X, dense, mlp.act, ctx.device, settings.chunk_tokens)
        result = sparsellm_mlp(X, Y, dense, layerwise, mlp.act, prune, settings, ctx.device)
        del X, Y
        if result.improved:
            self._write(mlp, result.weights)
            # Never leave non-finite weights in the model (e.g. overflow in a half-precision dtype).
            if not all(torch.isfinite(layer.module.weight).all() for layer in mlp.layers):
                self._write(mlp, layerwise)
                result = replace(result, weights=layerwise, kept="layerwise",
                                 note="non-finite weights after writing back; kept the layer-wise weights")
        errors = {k: (v if math.isfinite(v) else None) for k, v in result.errors.items()}  # JSON-safe
        record.update(kept=result.kept, error_layerwise=errors["layerwise"], error=errors[result.kept], errors=errors)
        if result.note:
            record["note"] = result.note.strip()
        return record

    @staticmethod
    def _write(mlp: FoundMLP, weights: MLPWeights) -> None:
        for layer, weight in ((mlp.up, weights.up), (mlp.down, weights.down), (mlp.gate, weights.gate)):
            if layer is not None:
                layer.set_weight(weight)


SETTINGS = SparseLLMSettings
