"""The chapter's GPT: embeddings, pre-LayerNorm transformer blocks, final norm, head.

Module names follow the book (``tok_emb``, ``trf_blocks``, ``final_norm``, ``out_head``)
so that "unfreeze the last block" reads the same here as in the chapter. Attention uses
``scaled_dot_product_attention(is_causal=True)`` instead of an explicit mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of one GPT; field names are the chapter's ``BASE_CONFIG`` keys."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


GPT2_SIZES = {
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),
}
SMALL_CONFIGS = {
    # Sized for a 2-core CPU: the embedding table dominates, the blocks stay cheap.
    "tiny": GPTConfig(context_length=256, emb_dim=64, n_heads=4, n_layers=1),
    "mini": GPTConfig(context_length=512, emb_dim=256, n_heads=4, n_layers=4),
}
MODEL_CONFIGS = {**GPT2_SIZES, **SMALL_CONFIGS}
Positions = tuple[torch.Tensor, torch.Tensor]  # row and column indices, one pair per position


def model_config(name: str) -> GPTConfig:
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of {', '.join(MODEL_CONFIGS)}"
        ) from None


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.emb_dim % cfg.n_heads:
            raise ValueError(f"emb_dim {cfg.emb_dim} is not divisible by n_heads {cfg.n_heads}")
        self.n_heads = cfg.n_heads
        self.dropout = cfg.drop_rate
        self.W_query = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)

    def heads(self, values: torch.Tensor) -> torch.Tensor:
        """[rows, tokens, emb_dim] as [rows, heads, tokens, head_dim]."""
        rows, tokens, _ = values.shape
        return values.view(rows, tokens, self.n_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        context = F.scaled_dot_product_attention(
            self.heads(self.W_query(x)),
            self.heads(self.W_key(x)),
            self.heads(self.W_value(x)),
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None,
        )
        return self.out_proj(context.transpose(1, 2).reshape(batch, tokens, dim))

    def forward_at(
        self, x: torch.Tensor, read: Positions, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The output at the positions ``read`` only, one row each: every position's key
        and value, but queries and the output projection only where read. Queries are
        grouped by row (``slots``), so each row's keys are used in place, not copied."""
        batch, tokens, dim = x.shape
        rows, columns = read
        slot = slots(rows, batch)
        width = int(slot.max()) + 1 if len(slot) else 1
        asked = torch.zeros(batch, width, dtype=torch.long, device=x.device)  # spares: column 0
        asked[rows, slot] = columns
        query = self.W_query(x[torch.arange(batch, device=x.device)[:, None], asked])
        if attn_mask is None:
            allowed = torch.arange(tokens, device=x.device) <= asked[:, :, None]
        else:
            allowed = attn_mask[:, 0].gather(1, asked[:, :, None].expand(-1, -1, tokens))
        context = F.scaled_dot_product_attention(
            self.heads(query),
            self.heads(self.W_key(x)),
            self.heads(self.W_value(x)),
            attn_mask=allowed[:, None],
        )
        return self.out_proj(context.transpose(1, 2)[rows, slot].reshape(len(rows), dim))


def slots(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Each entry's rank among the entries of its row: where its query sits in that row's
    group (see ``MultiHeadAttention.forward_at``)."""
    counts = torch.bincount(rows, minlength=batch)
    order = torch.argsort(rows, stable=True)
    firsts = (counts.cumsum(0) - counts)[rows[order]]
    slot = torch.empty_like(rows)
    slot[order] = torch.arange(len(rows), device=rows.device) - firsts
    return slot


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), attn_mask))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))

    def forward_at(
        self, x: torch.Tensor, read: Positions, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The block's output at the positions ``read`` only (inference: no dropout)."""
        x_read = x[read] + self.att.forward_at(self.norm1(x), read, attn_mask)
        return x_read + self.ff(self.norm2(x_read))


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    def features(
        self,
        in_idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        read: Positions | None = None,
    ) -> torch.Tensor:
        """Final-normalised hidden states, one per position: what ``out_head`` reads.

        By default every row is one causal sequence. Packed rows (several sequences one
        after another, see :mod:`spam_gpt.packing`) pass each token's ``positions`` and a
        boolean ``attn_mask`` (rows x 1 x tokens x tokens, True where attention is allowed).
        ``read`` (row and column indices) returns only those positions' states, one row each;
        in evaluation the last block then computes no others, since a classifier reads one
        token per message (the same numbers; gpt2-small 7 % faster, the one-block tiny model
        about 3x; benchmarks/RESULTS.md). Training keeps the full pass, so that dropout
        draws exactly as before.
        """
        if positions is None:
            positions = torch.arange(in_idx.shape[1], device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))
        last_at_read = read is not None and not self.training and len(self.trf_blocks) > 0
        for block in self.trf_blocks[:-1] if last_at_read else self.trf_blocks:
            x = block(x, attn_mask)
        if last_at_read:
            x = self.trf_blocks[-1].forward_at(x, read, attn_mask)
        elif read is not None:
            x = x[read]
        return self.final_norm(x)

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        return self.out_head(self.features(in_idx))


def init_gpt2_weights(model: nn.Module) -> None:
    """GPT-2's initialisation (normal, std 0.02), which trains from scratch far better
    than PyTorch's defaults (N(0, 1) embeddings) on a small model."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def generate_text_simple(
    model: GPTModel, idx: torch.Tensor, max_new_tokens: int, context_size: int
) -> torch.Tensor:
    """Greedy decoding, one token at a time, as in chapter 4."""
    model.eval()
    for _ in range(max_new_tokens):
        with torch.inference_mode():
            logits = model(idx[:, -context_size:])[:, -1, :]
        idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return idx
