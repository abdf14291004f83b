"""Attention pooling ("ada pooling", reference §2.5) and the frozen-text classifier (§2.6)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_model.layers import CrossAttention, Mlp


class _AttentionPool(nn.Module):
    """Cross-attention of a query on a token set; one LayerNorm (`ln_1`) shared by query, keys and values."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.attn(self.ln_1(query), self.ln_1(tokens))


class AdaPoolingLayer(nn.Module):
    """One spatial-then-temporal pooling step updating the frame query q_s and the video query q_v."""

    def __init__(self, dim: int, num_heads: int, sparse_frames: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.spatial_transformer = _AttentionPool(dim, num_heads)
        self.ln_out_spat_cls_token = nn.LayerNorm(dim)
        self.output_map_spatial_cls_token = Mlp(dim, hidden)
        self.temporal_transformer = _AttentionPool(dim, num_heads)
        self.ln_out_temp_cls_token = nn.LayerNorm(dim)
        self.output_map_cls_token = Mlp(dim, hidden)
        self.positional_embedding = nn.Parameter(torch.empty(1, sparse_frames, dim))
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)

    def forward(
        self, q_s: torch.Tensor, q_v: torch.Tensor, tokens: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q_s: (B*T, 1, D) per-frame query; q_v: (B, 1, D) video query; tokens: (B*T, N+1, D)
        q_s = q_s + self.spatial_transformer(q_s, tokens)  # attend over the N+1 tokens of each frame
        q_s = q_s + self.output_map_spatial_cls_token(q_s, norm=self.ln_out_spat_cls_token)
        frames = q_s.view(batch, -1, q_s.shape[-1]) + self.positional_embedding  # (B, T, D)
        q_v = q_v + self.temporal_transformer(q_v, frames)  # attend over the T frame tokens
        q_v = q_v + self.output_map_cls_token(q_v, norm=self.ln_out_temp_cls_token)
        return q_s, q_v


def cosine_logits(video_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """exp(logit_scale) * cos(video, text): (B, E) x (K, E) -> (B, K). `text_emb` must already be L2-normalised."""
    video = F.normalize(video_emb.float(), dim=-1)
    return math.exp(logit_scale) * video @ text_emb.float().t()


_DOUBLE_QUOTES = re.compile("[\"\u201c\u201d]")  # straight and typographic double quotes; never apostrophes


class TextClassifier:
    """Class-name embeddings from the frozen CLIP text tower, cached per label set.

    The cache key is the tuple of prompt texts itself (the authors keyed on the count, which goes stale when two
    label sets have the same size) plus the device. It holds no dtype: every entry is float32 whatever precision the
    tower runs in, and the tower's precision is fixed when the model is built (clip_precision), so no entry can be
    served in a dtype other than the one asked for. A tower cast to another dtype afterwards (DeepSpeed's bf16 casts
    the whole module) keeps being served the embeddings computed before, by design: training caches its label set
    and then releases the text tower, so a key that changed with the cast could only raise. Not an nn.Module: it
    holds no trainable state and must not appear in checkpoints.
    """

    def __init__(self, encode_text, tokenizer, prompt_template: str = "{}", max_cached: int = 8):
        self._encode_text = encode_text
        self._tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.max_cached = max_cached
        self._cache: dict[tuple, torch.Tensor] = {}

    def prompts(self, class_names: Sequence[str]) -> tuple[str, ...]:
        """Prompt texts for class names: double quotes stripped (as the authors do), template applied.

        Apostrophes stay: "massaging person's head" is what the text tower reads, not "massaging persons head"."""
        cleaned = (_DOUBLE_QUOTES.sub("", name).strip() for name in class_names)
        return tuple(self.prompt_template.format(name) for name in cleaned)

    @torch.no_grad()
    def embeddings(self, class_names: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """L2-normalised text embeddings, (K, E) float32, computed once per label set and device."""
        if isinstance(class_names, str):
            raise TypeError("class_names must be a sequence of class names, not one string")
        if len(class_names) == 0:
            raise ValueError("class_names is empty: a text classifier needs at least one class")
        texts = self.prompts(class_names)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must share one entry
            device = torch.device("cuda", torch.cuda.current_device())
        key = (texts, str(device))
        cached = self._cache.get(key)
        if cached is None:
            tokens = self._tokenizer(list(texts)).to(device)
            cached = F.normalize(self._encode_text(tokens).float(), dim=-1)
            if len(self._cache) >= self.max_cached:  # bounded: a sweep over many label sets must not leak memory
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = cached
        return cached

    def clear(self) -> None:
        self._cache.clear()
