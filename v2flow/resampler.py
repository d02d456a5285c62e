"""Visual-vocabulary resampler: query features -> a soft categorical over a frozen LLM embedding table.

Each query is projected into the LLM's embedding space and scored against the (centred, L2-normalised)
vocabulary rows by cosine similarity divided by a temperature. The soft distribution p gives the soft
embedding ``p @ E`` (a point in the LLM's embedding space); the discrete token is ``argmax p``, deterministic
at inference. During training the forward value is the hard row ``E[argmax]`` and the gradient flows
through p (straight-through), optionally with Gumbel noise.

Collapse is fought with the entropy terms of MAGVIT-2 / Selftok: each token's distribution should be sharp
(low per-token entropy) while the batch as a whole spreads over the vocabulary (high entropy of the mean
distribution).

``quantizer="vq"`` is the V2Flow paper's variant: a cosine codebook of ``codebook_size`` codes (EMA
updates, dead-code restart) quantises the soft embeddings; ids are codebook indices, not LLM token ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .vocab import LLMVocabulary

QUANTIZERS = ("vocab", "vq")
ESTIMATORS = ("projected", "softmax")


@dataclass
class ResamplerOutput:
    """indices (B, N) entry indices (vocabulary rows, or codebook codes for vq); embeddings (B, N, d) what the
    decoder reads (straight-through in training); soft_embeddings (B, N, d) = p @ E; probs (B, N, K);
    losses: named regulariser terms (already weighted)."""

    indices: torch.Tensor
    embeddings: torch.Tensor
    soft_embeddings: torch.Tensor
    probs: torch.Tensor
    losses: dict[str, torch.Tensor]


def empty_vocabulary(num_entries: int, dim: int) -> LLMVocabulary:
    """Placeholder rows (zeros) of the right shape; the real rows arrive with `V2FlowTokenizer.set_vocabulary`."""
    return LLMVocabulary(torch.zeros(num_entries, dim), torch.arange(num_entries), "", num_entries)


class CosineCodebook(nn.Module):
    """Cosine-similarity VQ codebook with EMA updates and dead-code restart (V2Flow's quantizer).

    Codes live on the unit sphere; inputs are L2-normalised before matching.
    """

    def __init__(self, *, codebook_size: int, dim: int, decay: float = 0.99, dead_threshold: float = 1e-3) -> None:
        super().__init__()
        self.decay = decay
        self.dead_threshold = dead_threshold
        self.register_buffer("codes", F.normalize(torch.randn(codebook_size, dim), dim=-1))
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", self.codes.clone())

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """x (B, N, d) -> (quantised (B, N, d) straight-through, indices (B, N), commitment loss)."""
        unit = F.normalize(x.float(), dim=-1)
        indices = (unit @ self.codes.T).argmax(-1)  # (B, N)
        quantised = self.codes[indices]  # (B, N, d)
        if self.training:
            self._ema_update(unit.flatten(0, 1), indices.flatten(), generator)
        commit = F.mse_loss(unit, quantised.detach())
        return unit + (quantised - unit).detach(), indices, commit

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor, generator: torch.Generator | None) -> None:
        onehot = F.one_hot(idx, self.codes.shape[0]).type(flat.dtype)  # (M, K)
        counts, sums = onehot.sum(0), onehot.T @ flat  # (K,), (K, d)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:  # statistics of the global batch: every rank makes the same update
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.codes.copy_(F.normalize(self.embed_sum, dim=-1))
        dead = self.cluster_size < self.dead_threshold  # the same on every rank
        if dead.any():  # restart dead codes at random inputs of the (global) batch
            n_dead = int(dead.sum())
            pick = torch.randint(flat.shape[0], (n_dead,), device=flat.device, generator=generator)
            new = flat[pick]  # (n_dead, d)
            if distributed:  # each rank draws from its own inputs; dead code j takes rank j % world's draw
                world = torch.distributed.get_world_size()
                drawn = [torch.empty_like(new) for _ in range(world)]
                torch.distributed.all_gather(drawn, new)
                rows = torch.arange(n_dead, device=new.device)
                new = torch.stack(drawn)[rows % world, rows]
            self.codes[dead] = new
            self.embed_sum[dead] = new
            self.cluster_size[dead] = 1.0


class _ScoresAndEntropies(torch.autograd.Function):
    """query (B, N, c), table (K, c), temperature -> the argmax (B, N) and probs (B, N, K) of
    logits = query @ table.T / temperature (both without gradient), the mean per-token entropy and the entropy
    of the mean distribution (with gradients to query and table): the ``projected`` estimator in training.

    The same operations as the autograd path give the same values; only the backward differs, in closed form.
    Why: the (B, N, K) tensors are the largest of a training step (33.5 MB each for configs/mnist.yaml), and on
    CPUs each fresh one costs page faults (allocations this large are mapped anew every time). Autograd's
    graph through the division, softmax, log_softmax, product and mean allocates 12 of them per step (counted
    with the profiler for configs/mnist.yaml); this allocates 4. With p = probs, R = B*N rows, H = per-row entropy, m = mean of p over the rows and
    g = dH(m)/dm = -(log m + 1): d mean(H) / d logits = -(p / R) (log p + H), d H(m) / d logits = (p / R) (g - p.g).
    """

    @staticmethod
    def forward(ctx, query: torch.Tensor, table: torch.Tensor, temperature: float):
        logits = (query @ table.T).div_(temperature)  # (B, N, K)
        indices = logits.argmax(-1)  # (B, N)
        probs = logits.softmax(-1)
        log_probs = logits.log_softmax(-1)
        row_entropy = -torch.mul(probs, log_probs, out=logits).sum(-1)  # (B, N); the logits are done with
        mean_probs = probs.flatten(0, -2).mean(0)  # (K,)
        batch_entropy = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
        ctx.save_for_backward(query, table, probs, log_probs, row_entropy, mean_probs)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(indices, probs)
        ctx.set_materialize_grads(False)  # no zero-filled (B, N, K) gradient for probs
        return indices, probs, row_entropy.mean(), batch_entropy

    @staticmethod
    def backward(ctx, _grad_indices, _grad_probs, grad_sample: torch.Tensor | None, grad_batch: torch.Tensor | None):
        query, table, probs, log_probs, row_entropy, mean_probs = ctx.saved_tensors
        if grad_sample is None and grad_batch is None:
            return None, None, None
        zero = probs.new_zeros(())
        grad_sample = zero if grad_sample is None else grad_sample
        grad_batch = zero if grad_batch is None else grad_batch
        # dH(m)/dm, zero where clamp_min held m at its floor (as autograd's clamp_min backward)
        dm = -(mean_probs.clamp_min(1e-12).log() + (mean_probs >= 1e-12).to(probs.dtype))  # (K,)
        grad = probs * dm  # (B, N, K), the one new big tensor of the backward
        p_dm = grad.sum(-1, keepdim=True)  # (B, N, 1); a summed product, as accurate as autograd's (not a matvec)
        torch.add(log_probs, row_entropy[..., None], out=grad)
        grad.mul_(-grad_sample).add_(dm * grad_batch).sub_(p_dm * grad_batch)
        grad.mul_(probs).div_(row_entropy.numel() * ctx.temperature)  # d loss / d (query @ table.T)
        grad_query = grad @ table if ctx.needs_input_grad[0] else None  # (B, N, c)
        grad_table = (query.flatten(0, -2).T @ grad.flatten(0, -2)).T if ctx.needs_input_grad[1] else None  # (K, c)
        return grad_query, grad_table, None


class VocabularyResampler(nn.Module):
    """Query features (B, N, D) -> soft categorical over K vocabulary rows -> embeddings (B, N, d_llm) + ids.

    Args:
        input_dim: D, width of the query features.
        num_entries: K, rows of the vocabulary subset.
        llm_dim: d_llm, width of the LLM's embedding table.
        quantizer: ``"vocab"`` (ids are LLM token ids) or ``"vq"`` (ids are codebook indices).
        estimator: how ``quantizer="vocab"`` trains. ``"projected"`` (default): queries and the frozen rows
            (through one learned linear map, SimVQ) meet in a ``code_dim`` space; the token is the nearest
            row by cosine, trained VQ-style (straight-through, codebook + commitment losses).
            ``"softmax"``: queries are projected into the LLM space and the forward value is the hard row with
            the gradient of ``p @ E`` (softmax straight-through, optionally Gumbel).
        code_dim: width of the scoring space of the ``projected`` estimator.
        temperature: softmax temperature on cosine scores (annealed by the training module).
        gumbel: add Gumbel noise to the logits during training (never at inference).
        sample_entropy_weight: weight of the mean per-token entropy (pushes each token to be sharp).
        batch_entropy_weight: weight of the entropy of the batch-mean distribution (pushes usage to spread).
        codebook_size: number of codes for ``quantizer="vq"``.
        commitment_weight: weight of the commitment loss (vq, and the projected estimator).
    """

    def __init__(
        self,
        *,
        input_dim: int,
        num_entries: int,
        llm_dim: int,
        quantizer: str = "vocab",
        estimator: str = "projected",
        code_dim: int = 64,
        temperature: float = 0.02,
        gumbel: bool = False,
        sample_entropy_weight: float = 0.1,
        batch_entropy_weight: float = 0.1,
        codebook_size: int = 4096,
        commitment_weight: float = 0.25,
    ) -> None:
        super().__init__()
        if quantizer not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {quantizer!r}; choose one of {QUANTIZERS}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if gumbel and (estimator != "softmax" or quantizer != "vocab"):
            raise ValueError("gumbel=True applies only to estimator='softmax' with quantizer='vocab'")
        self.quantizer = quantizer
        self.estimator = estimator
        self.temperature = temperature
        self.gumbel = gumbel
        self.sample_entropy_weight = sample_entropy_weight
        self.batch_entropy_weight = batch_entropy_weight
        self.commitment_weight = commitment_weight
        score_dim = code_dim if estimator == "projected" else llm_dim
        self.proj = nn.Sequential(nn.Linear(input_dim, input_dim), nn.GELU(), nn.Linear(input_dim, score_dim))
        # "projected": the frozen rows are mapped by one learned linear layer into the scoring space
        self.row_proj = nn.Linear(llm_dim, code_dim, bias=False) if estimator == "projected" else None
        self.vocabulary = empty_vocabulary(num_entries, llm_dim)
        self.codebook = CosineCodebook(codebook_size=codebook_size, dim=llm_dim) if quantizer == "vq" else None

    @property
    def num_codes(self) -> int:
        """Size of the id space: K vocabulary rows, or the vq codebook size."""
        return self.codebook.codes.shape[0] if self.codebook is not None else self.vocabulary.num_entries

    def unit_table(self) -> torch.Tensor:
        """(K, c) unit-norm codes the queries are scored against: the centred vocabulary rows (centring removes
        the table's common direction, so cosine scores are not dominated by a few hub rows), mapped by the
        learned `row_proj` for the ``projected`` estimator."""
        rows = self.vocabulary.embeddings
        rows = rows - rows.mean(0)
        if self.row_proj is not None:
            rows = self.row_proj(rows)
        return F.normalize(rows, dim=-1)

    def queries(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, c) unit-norm queries."""
        return F.normalize(self.proj(features).float(), dim=-1)

    @property
    def embed_dim(self) -> int:
        """Width of what the decoder reads: the code width for ``projected``, else the LLM width."""
        return (
            self.row_proj.out_features if self.row_proj is not None and self.codebook is None else self.vocabulary.dim
        )

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Entry indices (B, N) -> the embeddings the decoder reads (B, N, embed_dim)."""
        if self.codebook is not None:
            return self.codebook.codes[indices]
        if self.row_proj is not None:
            return self.unit_table()[indices]
        return self.vocabulary.embeddings[indices]

    def forward(self, features: torch.Tensor, generator: torch.Generator | None = None) -> ResamplerOutput:
        # scores stay in float32 under autocast: bf16 cosines (~2^-8) divided by a small temperature flip argmaxes
        with torch.autocast(features.device.type, enabled=False):
            return self._forward(features.float(), generator)

    def _forward(self, features: torch.Tensor, generator: torch.Generator | None) -> ResamplerOutput:
        query = self.queries(features)  # (B, N, c)
        table = self.unit_table()  # (K, c)
        losses: dict[str, torch.Tensor] = {}
        indices = None
        if self.training and self.row_proj is not None and self.codebook is None:
            # "projected" in training: the probabilities feed only the entropy terms (gradient in closed form)
            indices, probs, sample_entropy, batch_entropy = _ScoresAndEntropies.apply(query, table, self.temperature)
            soft = None  # an output, not a training signal for "projected": skip its (B*N, K, d) matmul
        else:
            logits = query @ table.T / self.temperature  # (B, N, K)
            probs = logits.softmax(-1)
            soft = probs @ self.vocabulary.embeddings  # (B, N, d)
            if self.training:
                log_probs = logits.log_softmax(-1)
                sample_entropy = -(probs * log_probs).sum(-1).mean()
                mean_probs = probs.flatten(0, 1).mean(0)
                batch_entropy = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
        if self.training:
            losses["sample_entropy"] = self.sample_entropy_weight * sample_entropy
            losses["batch_entropy"] = -self.batch_entropy_weight * batch_entropy
        if self.codebook is not None:
            embeddings, indices, commit = self.codebook(soft, generator)
            if self.training:
                losses["commitment"] = self.commitment_weight * commit
            return ResamplerOutput(indices, embeddings, soft, probs, losses)
        if self.row_proj is not None:
            # VQ-style straight-through onto the projected frozen rows (SimVQ): the nearest code by cosine; the
            # codebook term trains the shared linear map, which moves every code at once and keeps all in play
            indices = logits.argmax(-1) if indices is None else indices  # (B, N)
            code = table[indices]  # (B, N, c)
            if self.training:
                losses["codebook"] = F.mse_loss(code, query.detach())
                losses["commitment"] = self.commitment_weight * F.mse_loss(query, code.detach())
                code = query + (code - query).detach()
            return ResamplerOutput(indices, code, soft, probs, losses)
        select = logits
        if self.training and self.gumbel:
            u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(1e-10, 1 - 1e-10)
            select = logits - torch.log(-torch.log(u))
        indices = select.argmax(-1)  # (B, N)
        hard = self.vocabulary.embeddings[indices]  # (B, N, d)
        if self.training:
            st_soft = select.softmax(-1) @ self.vocabulary.embeddings if self.gumbel else soft
            embeddings = hard + st_soft - st_soft.detach()  # straight-through: value of the row, gradient of p
        else:
            embeddings = hard
        return ResamplerOutput(indices, embeddings, soft, probs, losses)


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a usage histogram (K,) — the effective number of entries in use."""
    p = counts.float() / counts.sum().clamp_min(1)
    return math.exp(float(-(p * p.clamp_min(1e-12).log()).sum()))
