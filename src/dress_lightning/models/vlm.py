"""The vision-language model: image patch embeddings spliced into a causal LM at ``<image>`` tokens."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from dress_lightning.models.vision import VisionTower


class ImageTokenMismatchError(ValueError):
    """The ``<image>`` placeholders in a batch do not match the image features it carries."""


class VisionLanguageModel(nn.Module):
    """OpenCLIP vision tower -> projector -> Hugging Face causal LM.

    The data pipeline expands each image's ``<image>`` placeholder into ``num_image_tokens`` copies
    (as Hugging Face LLaVA does), so sequence lengths are known before the model runs and
    truncation can be checked; here each copy is replaced by one projected patch embedding.
    """

    def __init__(
        self,
        vision: VisionTower,
        projector: nn.Module,
        language_model: PreTrainedModel,
        image_token_id: int,
        pad_token_id: int,
        eos_token_id: int | list[int],
        resized_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.language_model = language_model
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.resized_embeddings = resized_embeddings
        """Whether the LM's embeddings grew for added tokens (checkpoints must then keep them)."""

    @property
    def num_image_tokens(self) -> int:
        """How many ``<image>`` tokens one image occupies in the sequence (= patch tokens)."""
        return self.vision.num_patches

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> projected patch embeddings (B, N, D_text)."""
        return self.projector(self.vision(pixel_values))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        images_per_row: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings (R, T, D) with every ``<image>`` token replaced by a patch embedding.

        Images come as ``pixel_values`` (B, 3, H, W), or as the vision tower's patch features
        ``image_features`` (B, N, D_vision) precomputed for a frozen tower (``VisionFeatureCache``).
        One image per row, or ``images_per_row`` (R,) in packed batches (several samples per row; the
        images in row order, as ``encoders.pack`` lays them out).
        """
        if pixel_values is not None and image_features is not None:
            raise ValueError("Pass pixel_values or precomputed image_features, not both.")
        images = pixel_values if pixel_values is not None else image_features
        embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, T, D)
        image_mask = input_ids == self.image_token_id  # (B, T)
        per_row = image_mask.sum(dim=1)
        num_images = 0 if images is None else images.shape[0]
        if images_per_row is None:
            images_per_row = torch.full_like(per_row, 1 if num_images else 0)
        # One image per sample, in batch order: every row must hold exactly N placeholders per image.
        expected = images_per_row.to(per_row) * self.num_image_tokens
        if num_images != int(images_per_row.sum()) or not torch.equal(per_row, expected):
            raise ImageTokenMismatchError(
                f"Batch has {num_images} image(s) for {input_ids.shape[0]} row(s) holding {images_per_row.tolist()} "
                f"sample(s) whose <image> token counts are {per_row.tolist()}; each sample needs exactly "
                f"{self.num_image_tokens} (one image, expanded to num_image_tokens). A sequence was probably truncated "
                "through its image or built without expanding <image>; refusing to train on misaligned tokens."
            )
        if num_images == 0:
            return embeds
        if image_features is None:
            image_features = self.vision(pixel_values)  # (B, N, D_vision)
        elif image_features.shape[1] != self.num_image_tokens:
            raise ImageTokenMismatchError(
                f"image_features hold {image_features.shape[1]} patch(es) per image; this model's vision tower "
                f"gives {self.num_image_tokens}: were they computed by another tower?"
            )
        features = self.projector(image_features).to(embeds.dtype)  # (B, N, D)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        images_per_row: torch.Tensor | None = None,
        share_prefix: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Hugging Face style forward; ``loss`` is the mean next-token loss over ``labels`` != -100.

        ``image_features`` (B, N, D_vision) replace ``pixel_values`` when a frozen tower's features were cached;
        ``images_per_row`` (R,) is for packed rows (``embed``).

        ``share_prefix``: the text every row starts with (a chat template's system prompt, before the first
        ``<image>``) runs once and every row attends to its keys and values (``generate`` explains the layout).
        It applies where the batch asks for no logit inside that prefix: ``logits_to_keep`` a (B, T) mask (the
        loss's positions, as the tasks pass them), no ``labels``, rows not packed, a prefix of at least
        ``MIN_SHARED_PREFIX`` tokens; otherwise the plain forward runs. The logits are those of the plain forward
        up to float rounding (the same keys in another order).
        """
        keep = kwargs.get("logits_to_keep")
        if share_prefix and labels is None and images_per_row is None and attention_mask is not None \
                and isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and "position_ids" not in kwargs:
            # No logit inside the prefix: the first position whose logits the caller reads bounds it.
            first_kept = int(keep.any(dim=0).int().argmax()) if keep.any() else keep.shape[1]
            shared = min(_shared_prefix_length(input_ids, attention_mask, self.image_token_id), first_kept)
            if shared >= MIN_SHARED_PREFIX:
                kwargs["use_cache"] = True  # the prefix's keys and values reach the rows through a cache
                output, _ = self._forward_shared_prefix(input_ids, attention_mask, shared, DynamicCache(
                    config=self.language_model.config), pixel_values=pixel_values, image_features=image_features,
                    **kwargs)
                return output
        inputs_embeds = self.embed(input_ids, pixel_values, image_features, images_per_row)
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs
        )

    def _forward_shared_prefix(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        shared: int,
        cache: DynamicCache,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> tuple[CausalLMOutputWithPast, torch.Tensor]:
        """The LM over rows (R, T) that all start with the same ``shared`` tokens, the prefix run once.

        Rows [padding, prefix, rest] (left-padded prompts) or [prefix, rest, padding] (right-padded training
        rows): the prefix (1, P) fills ``cache``, its keys and values are repeated for every row, then the rest
        of each row (R, T - P) runs attending to them. Returns the rest's output (its positions are the rows
        without the prefix; a (R, T) ``logits_to_keep`` mask is cut the same way) and the attention mask
        (R, T) of what the cache now holds, [prefix, rest of each row].
        """
        lm, rows = self.language_model, input_ids.shape[0]
        cache_argument = {_cache_keyword(lm): cache}
        in_prefix = _prefix_columns(attention_mask, shared)  # (R, T), P columns per row

        def rest(t: torch.Tensor) -> torch.Tensor:
            return t[~in_prefix].view(rows, -1)  # (R, T - P)

        prefix = input_ids[0][in_prefix[0]][None]  # (1, P)
        lm(inputs_embeds=self.embed(prefix), position_ids=torch.arange(shared, device=prefix.device)[None],
           use_cache=True, logits_to_keep=1, **cache_argument)
        cache.batch_repeat_interleave(rows)
        rest_mask = rest(attention_mask)
        mask = torch.cat([rest_mask.new_ones(rows, shared), rest_mask], dim=1)  # (R, T)
        positions = shared + (rest_mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count on from the prefix
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.shape == input_ids.shape:
            logits_to_keep = rest(logits_to_keep)
        output = lm(inputs_embeds=self.embed(rest(input_ids), pixel_values, image_features), attention_mask=mask,
                    position_ids=positions, logits_to_keep=logits_to_keep, **cache_argument, **kwargs)
        return output, mask

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        streamer=None,
        negative_input_ids: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        num_return_sequences: int = 1,
        share_prefix: bool = True,
    ) -> torch.Tensor:
        """Batched generation for left-padded prompts (B, T) with KV cache; returns new tokens (B, T_new).

        ``streamer`` (a ``transformers`` streamer such as ``TextStreamer``; batch size 1) receives each new
        token as it is chosen, for chat interfaces that print the answer while it is written.

        Classifier-free guidance: with ``negative_input_ids`` (B, T') (the same prompts under another
        condition, left-padded) each step decodes from ``l_u + guidance_scale * (l_c - l_u)``, the logits of
        the prompt (``l_c``) and of its negative (``l_u``); both continue with the chosen token. The two
        run as one batch of 2B rows (one forward per step), sharing the image features (each image is
        encoded once).

        Sequences that stop early are padded with ``pad_token_id``. A row that has stopped leaves the
        batch (and the KV cache), so later steps only compute the rows still generating: the cost of a
        batch follows the sum of its answers' lengths, not batch size x the longest answer.

        ``num_return_sequences`` (n): answers per prompt, rows ``i * n`` to ``i * n + n - 1`` of the (B * n, T_new)
        result, as transformers orders them. Each prompt (its image, its KV cache) is encoded once and its cache
        copied for its n answers, which then decode as n rows (different ones when sampling).

        ``share_prefix``: text that every prompt starts with (the system prompt of a chat template, before the
        first ``<image>``) is encoded once and its KV cache shared by all rows, when it is at least
        ``MIN_SHARED_PREFIX`` tokens long; each row's cache then reads [prefix, padding, rest of the prompt]
        instead of [padding, prefix, rest], the same attention with keys in another order. Sampling
        draws from torch's global RNG: seed it (``lightning.seed_everything``) for reproducible samples.
        """
        if (attention_mask[:, -1] == 0).any():
            raise ValueError(
                "generate() needs left-padded prompts (the last position of every row must be a real token); "
                "set tokenizer.padding_side = 'left' when batching prompts."
            )
        if num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be at least 1, got {num_return_sequences}.")
        stops = self.eos_token_id if eos_token_id is None else eos_token_id
        stops = torch.tensor([stops] if isinstance(stops, int) else list(stops), dtype=torch.long,
                             device=input_ids.device)
        guided = negative_input_ids is not None
        image_features = None if pixel_values is None else self.vision(pixel_values)  # (B, N, D_vision)
        if guided:
            if negative_attention_mask is None or negative_input_ids.shape[0] != input_ids.shape[0]:
                raise ValueError("guidance needs negative_input_ids and negative_attention_mask, one row per prompt")
            input_ids, attention_mask = _stack_left_padded(
                (input_ids, attention_mask), (negative_input_ids, negative_attention_mask), self.pad_token_id
            )  # (2B, T'')
            if image_features is not None:  # each image encoded once, for both passes
                image_features = torch.cat([image_features, image_features])
        lm = self.language_model
        batch = (input_ids.shape[0] // 2 if guided else input_ids.shape[0]) * num_return_sequences
        new_tokens = torch.full((batch, max_new_tokens), self.pad_token_id, device=input_ids.device)
        rows = torch.arange(batch, device=input_ids.device)  # batch row of each active sequence
        mask = attention_mask
        cache = DynamicCache(config=lm.config)
        cache_argument = {_cache_keyword(lm): cache}
        shared = _shared_prefix_length(input_ids, mask, self.image_token_id) if share_prefix else 0
        if shared >= MIN_SHARED_PREFIX:
            output, mask = self._forward_shared_prefix(input_ids, mask, shared, cache, image_features=image_features,
                                                       use_cache=True, logits_to_keep=1)
        else:
            # Left padding: positions count real tokens only (as transformers' generate does).
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            output = lm(inputs_embeds=self.embed(input_ids, image_features=image_features), attention_mask=mask,
                        position_ids=positions, use_cache=True, logits_to_keep=1, **cache_argument)
        logits = output.logits[:, -1]  # (B or 2B, V)
        if num_return_sequences > 1:  # each prompt's cache copied for its answers: (B * n or 2B * n, ...)
            cache.batch_repeat_interleave(num_return_sequences)
            mask, logits = (t.repeat_interleave(num_return_sequences, dim=0) for t in (mask, logits))
        steps = 0
        for step in range(max_new_tokens):
            if guided:
                conditioned, negative = logits.float().chunk(2)  # (b, V) each
                logits = negative + guidance_scale * (conditioned - negative)
            tokens = _next_tokens(logits.float(), do_sample, temperature, top_p)  # (b,)
            new_tokens[rows, step] = tokens
            steps = step + 1
            if streamer is not None:
                streamer.put(tokens.cpu())
            going = ~torch.isin(tokens, stops)
            if step + 1 == max_new_tokens or not going.any():
                break
            if not going.all():
                keep = going.nonzero().squeeze(1)
                rows, tokens = rows[keep], tokens[keep]
                cache_rows = torch.cat([keep, keep + len(going)]) if guided else keep
                mask = mask[cache_rows]
                cache.batch_select_indices(cache_rows)
            if guided:
                tokens = torch.cat([tokens, tokens])
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = lm(input_ids=tokens[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                        use_cache=True, **cache_argument).logits[:, -1]
        if streamer is not None:
            streamer.end()
        return new_tokens[:, :steps]


def _cache_keyword(language_model: nn.Module) -> str:
    """The name the LM's forward takes its KV cache under.

    transformers 5 renames ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40); earlier 5.x
    releases and remote-code models take the old name. A LoRA (PEFT) wrapper passes it on to its base model.
    """
    base = language_model.get_base_model() if hasattr(language_model, "get_base_model") else language_model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


MIN_SHARED_PREFIX = 16
"""Shortest common prefix (tokens) that ``forward`` and ``generate`` run once for all rows. A shorter one (a BOS
token, a one-word template) would save little beside the fixed cost of its own forward; the value is not tuned."""


def _shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> int:
    """Tokens (before any ``<image>``) that every row of (R, T) begins with; 0 for a single row.

    Rows are padded on one side (left for prompts, right for training); at least one token of every row is left
    out of the prefix, so that the rest of each row has a position of its own.
    """
    rows, length = input_ids.shape
    lengths = attention_mask.sum(dim=1)  # (R,)
    starts = attention_mask.int().argmax(dim=1)  # (R,) first real token
    columns = torch.arange(length, device=input_ids.device)
    run = (columns >= starts[:, None]) & (columns < (starts + lengths)[:, None])
    if rows < 2 or not torch.equal(attention_mask.bool(), run):
        return 0  # one row, or a mask with holes: nothing to share safely
    limit = int(lengths.min()) - 1
    if limit < 1:
        return 0
    firsts = input_ids.gather(1, starts[:, None] + columns[:limit])  # (R, limit) first real tokens
    same = (firsts == firsts[:1]).all(dim=0) & (firsts[0] != image_token_id)
    return int(same.cumprod(dim=0).sum())


def _prefix_columns(attention_mask: torch.Tensor, shared: int) -> torch.Tensor:
    """(R, T) bool: the first ``shared`` real tokens of each row (rows padded on one side)."""
    start = attention_mask.int().argmax(dim=1)[:, None]  # (R, 1)
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None]  # (1, T)
    return (columns >= start) & (columns < start + shared)


def _stack_left_padded(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded (ids, mask) batches as one: both padded on the left to the longer length, stacked."""
    length = max(first[0].shape[1], second[0].shape[1])

    def pad(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extra = length - ids.shape[1]
        return (torch.nn.functional.pad(ids, (extra, 0), value=pad_token_id),
                torch.nn.functional.pad(mask, (extra, 0), value=0))

    (ids_a, mask_a), (ids_b, mask_b) = pad(*first), pad(*second)
    return torch.cat([ids_a, ids_b]), torch.cat([mask_a, mask_b])


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float) -> torch.Tensor:
    """Greedy or nucleus-sampled next tokens (b,) from logits (b, V), as transformers' warpers do it."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(1)
